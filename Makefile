# The two commands of the README. Both set up .venv first (idempotent: seconds when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -q

DEMO_DIR ?= output/demo
DEMO_CONFIG := projects/SparseDETR/configs/demo.yaml
# processes of the demo's training (train_net.py --num-gpus on the CPU: DDP over gloo): two where the machine
# has two cores or more. Each takes its share of the cores (train_net.py's thread split: one thread each on two
# cores), which trains 1.5-1.7x faster than one process with two threads: most of an iteration is small ops that
# threads do not share. The global batch (SOLVER.IMS_PER_BATCH 8) and every image's augmentation stay the same.
DEMO_PROCESSES ?= $(shell [ "$$(nproc 2>/dev/null || echo 1)" -ge 2 ] && echo 2 || echo 1)

.PHONY: setup test demo clean

setup:
	@VENV=$(VENV) bash scripts/bootstrap.sh

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Generate the shapes dataset (first run), train the demo model on the CPU, evaluate it, draw pictures.
# --resume: an interrupted demo continues where it stopped; a finished one is only evaluated again.
demo: setup
	$(PY) projects/SparseDETR/train_net.py --num-gpus $(DEMO_PROCESSES) --resume --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_DIR)
	$(PY) projects/SparseDETR/tools/demo_report.py --config-file $(DEMO_CONFIG) --output-dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) build *.egg-info projects/SparseDETR/sparse_detr/_C.*.so
