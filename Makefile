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
