# The two commands of the README. Both set up .venv first (idempotent: seconds when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -q

.PHONY: setup test clean

setup:
	@VENV=$(VENV) bash scripts/bootstrap.sh

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
