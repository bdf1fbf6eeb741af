# Two entry points for a fresh machine: `make train` and `make test`; then, on the trained run,
# `make eval`, `make sample` and `make tensorboard` (README: "The first hour").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/quickstart
# Extra arguments for the command of a target: make train ARGS=--config.train.num_steps=100
ARGS ?=
PROMPT ?= It is a truth universally acknowledged
# A paper config at the smoke scale (the tiny size, the shipped corpus): make smoke
PAPER ?= configs/pg19_flash.py
SMOKE_WORKDIR ?= runs/$(basename $(notdir $(PAPER)))_smoke
LOGDIR ?= runs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# libtpu, the TPU compiler, at the version jax pins (jax's `tpu` extra), kept apart from the
# environment (there jax would try to start a TPU with it): scripts/tpu_compile.py compiles for
# TPU chips with it when none is attached, and the tests run that check.
LIBTPU_DIR := $(VENV)/libtpu
LIBTPU_PIN = $(PY) -c 'import importlib.metadata as m; print(next(r.split(";")[0] for r in m.requires("jax") if r.startswith("libtpu")))'
$(LIBTPU_DIR)/.installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --target $(LIBTPU_DIR) "$$($(LIBTPU_PIN))"
	touch $@

.PHONY: setup train test lint eval sample tensorboard smoke tpu-compile launch-tpu
setup: $(VENV)/.installed

train: setup
	$(PY) train.py --config=configs/quickstart.py --workdir=$(WORKDIR) $(ARGS)

# Two test workers (pytest-xdist) where there are two cores or more, at most four: each is a JAX
# process with eight simulated devices, and the multi-process tests start two more each.
test: setup $(LIBTPU_DIR)/.installed
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile

# The Pallas TPU kernels compiled by Mosaic for v4, v5e, v5p and v6e chips, no TPU needed:
# make tpu-compile ARGS="--config=configs/pg19_flash.py --topologies=v5p:2x2x2" adds a train step.
tpu-compile: setup $(LIBTPU_DIR)/.installed
	$(PY) scripts/tpu_compile.py $(ARGS)

# Prints (never runs) the gcloud queued-resources and xpk commands that train a config on TPU
# slices (docs/launch.md): make launch-tpu ARGS="--config=configs/pg19_flash.py:8192 \
#   --accelerator=v5litepod-16 --num_slices=2 --workdir=gs://BUCKET/RUN"
launch-tpu: setup
	@$(PY) scripts/launch/tpu_commands.py $(ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

eval: setup
	$(PY) eval.py --workdir=$(WORKDIR) $(ARGS)

sample: setup
	$(PY) scripts/sample.py --workdir=$(WORKDIR) --prompt="$(PROMPT)" --num_tokens=100 \
		--temperature=0.8 --top_k=40 $(ARGS)

tensorboard: setup
	$(PY) scripts/run_tensorboard.py --logdir=$(LOGDIR) $(ARGS)

smoke: setup
	$(PY) train.py --config=$(PAPER):smoke --workdir=$(SMOKE_WORKDIR) $(ARGS)
