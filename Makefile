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

.PHONY: setup train test lint eval sample tensorboard smoke
setup: $(VENV)/.installed

train: setup
	$(PY) train.py --config=configs/quickstart.py --workdir=$(WORKDIR) $(ARGS)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

eval: setup
	$(PY) eval.py --workdir=$(WORKDIR) $(ARGS)

sample: setup
	$(PY) scripts/sample.py --workdir=$(WORKDIR) --prompt="$(PROMPT)" --num_tokens=100 \
		--temperature=0.8 --top_k=40 $(ARGS)

tensorboard: setup
	$(VENV)/bin/tensorboard --logdir=$(LOGDIR) $(ARGS)

smoke: setup
	$(PY) train.py --config=$(PAPER):smoke --workdir=$(SMOKE_WORKDIR) $(ARGS)
