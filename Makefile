# icons: make install | make run [ARGS="..."] | make test [PYTEST_ARGS="..."]
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := install

PYTHON ?= python3
VENV ?= .venv
# torch is installed first, pinned; pass e.g.
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for a CPU-only wheel.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
ARGS ?=
PYTEST_ARGS ?=

export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

STAMP := $(VENV)/.installed

.PHONY: install run test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -e ".[test]"
	touch $@

run: install
	$(VENV)/bin/python -m icons.run $(ARGS)

test: install
	$(VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf build src/*.egg-info .pytest_cache
