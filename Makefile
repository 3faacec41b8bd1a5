# `make demo`: set up .venv and train RedNet-26 on the digits set that scikit-learn ships (no download).
# `make test`: set up .venv and run the whole test suite (CPU, offline).
# `make mutants`: break one behaviour at a time in a scratch copy and check that the tests notice (slow).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup benchmark mutants

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

demo: setup
	$(PY) train.py model=rednet26 data=digits

test: setup
	$(PY) -m pytest -q --durations=20

benchmark: setup
	$(PY) scripts/benchmark.py

mutants: setup
	$(PY) scripts/mutants.py
