# The two commands of the README. Both set up .venv first (idempotent: seconds when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -q

DEMO_DIR ?= output/demo
DEMO_CONFIG := projects/SparseDETR/configs/demo.yaml
# torch threads of the demo's training process; the data-loading worker takes another core. One thread
# degrades gracefully when the machine is busy, where two OpenMP threads on two cores slow down sharply.
DEMO_THREADS ?= 1

.PHONY: setup test demo clean

setup:
	@VENV=$(VENV) bash scripts/bootstrap.sh

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Generate the shapes dataset (first run), train the demo model on the CPU, evaluate it, draw pictures.
# --resume: an interrupted demo continues where it stopped; a finished one is only evaluated again.
demo: setup
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) projects/SparseDETR/train_net.py --resume --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_DIR)
	$(PY) projects/SparseDETR/tools/demo_report.py --config-file $(DEMO_CONFIG) --output-dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) build *.egg-info projects/SparseDETR/sparse_detr/_C.*.so
