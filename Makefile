# The two commands of the README: `make demo` (set up + train + evaluate the embedded demo)
# and `make test` (set up + run the test suite; what CI runs).
PYTHON ?= python
TORCH ?= torch==2.13.0

.PHONY: install setup demo test

install:
	$(PYTHON) -m pip install --quiet $(TORCH) -r requirements-test.txt

setup: install
	$(PYTHON) data.py setup

test: setup
	$(PYTHON) -m pytest -q tests

data/demo/train.jsonl:
	$(PYTHON) data.py make-demo --out data/demo

demo: setup data/demo/train.jsonl
	$(PYTHON) train.py --config configs/demo.py --workdir runs/demo
	$(PYTHON) evaluate.py --ckpt runs/demo/checkpoints/last.pt --prompts prompt6
	@echo "TensorBoard: tensorboard --logdir runs"
