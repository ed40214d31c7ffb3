# Makefile - developer entry points for pykvm.
#
#   make run     set up (virtualenv + pykvm + test deps), build the guests, run the default guest
#   make test    set up, build the guests, run the whole test suite
#   make guests  build guests/*.S into guests/build/ (flat .bin and .elf)
#   make bench   the exit-cost benchmark (Python vs C)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup guests run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

guests:
	$(MAKE) -C guests

run: setup guests
	$(VENV)/bin/pykvm run

test: setup guests
	$(PY) -m pytest

bench: setup guests
	$(PY) scripts/bench_exits.py

clean:
	$(MAKE) -C guests clean
	rm -rf $(VENV) *.egg-info
