# Two commands get a researcher from a fresh clone to a working install:
#   make test    # creates .venv, installs resflows with its test extra, runs the default tests
#   make demo    # same set-up, then trains, evaluates and samples on the bundled 8x8 digits
# Set-up is skipped when .venv is complete and setup.py/requirements.txt have not changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.resflows-installed
DEMO_SAVE ?= experiments/demo_digits
# A small model on scikit-learn's bundled 8x8 digits: about 4 minutes on 2 CPU cores.
DEMO_FLAGS = --data digits --nblocks 3-3 --idim 64 --fc-idim 128 --batchsize 64 --nepochs 60 \
             --warmup-iters 200 --print-freq 100 --vis-freq 500 --seed 0 --nworkers 0

.PHONY: setup test test-slow test-all demo bench gpu-check clean-venv

setup: $(STAMP)

$(STAMP): setup.py requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt -e '.[test]'
	@touch $(STAMP)

# ruff first (lint and import order, ruff.toml): a few seconds, and CI runs it through this target.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow"

demo: $(STAMP)
	$(PY) train_img.py $(DEMO_FLAGS) --save $(DEMO_SAVE)
	$(PY) train_img.py --resume $(DEMO_SAVE)/models/most_recent.pth --evaluate --seed 0 --nworkers 0
	$(PY) train_img.py --resume $(DEMO_SAVE)/models/most_recent.pth --sample 64 --seed 0 --nworkers 0
	@echo
	@echo "demo outputs in $(DEMO_SAVE)/:"
	@echo "  logs                      training log"
	@echo "  tb/                       TensorBoard (tensorboard --logdir $(DEMO_SAVE)/tb)"
	@echo "  models/most_recent.pth    last checkpoint; models/checkpt-*.pth the best 5 by test bits/dim"
	@echo "  imgs/                     real images, samples and reconstructions during training"
	@echo "  eval.json                 test bits/dim of the EMA weights"
	@echo "  samples/samples_n64_t1.png  64 samples"

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py --preset make
	$(PY) benchmarks/bench_eval.py --preset make

# On a CUDA machine: CUDA-vs-CPU tests, NCCL, TF32 default, GPU benchmarks -> benchmarks/results/gpu.json.
# Without CUDA: says so, checks that the CUDA tests skip cleanly, exits 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean-venv:
	rm -rf $(VENV)
