# Two commands get a researcher from a fresh clone to a working install:
#   make test    # creates .venv, installs resflows with its test extra, runs the default tests
#   make demo    # same set-up, then trains, evaluates and samples on the bundled 8x8 digits
# Set-up is skipped when .venv is complete and setup.py/requirements.txt have not changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.resflows-installed
DEMO_SAVE ?= experiments/demo_digits

.PHONY: setup test test-slow test-all demo bench clean-venv

setup: $(STAMP)

$(STAMP): setup.py requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt -e '.[test]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow"

demo: $(STAMP)
	$(PY) scripts/demo.py --save $(DEMO_SAVE)

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py --preset make
	$(PY) benchmarks/bench_eval.py --preset make

clean-venv:
	rm -rf $(VENV)
