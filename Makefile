# bidirlm developer entry points. `make test` and `make demo` set up .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test lint format demo bench compile-check core-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the dependency list or the torch pin changes.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	TRITON_INTERPRET=$${TRITON_INTERPRET:-1} $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/bidirlm demo --quick

bench: $(STAMP)
	$(BIN)/bidirlm bench all

# Static GPU compile check (sm_90/gfx942/gfx90a, no GPU): what .ci/run runs after `make test`.
compile-check: $(STAMP)
	BIDIRLM_COMPILE_CHECK=1 $(BIN)/python -m pytest -m compile_suite tests/test_compile_suite.py -q -s

# The ops alone: a fresh venv with the core install only (no extras), then .ci/core_check.py.
core-check:
	rm -rf .cache/core-venv
	$(PYTHON) -m venv .cache/core-venv
	.cache/core-venv/bin/python -m pip install --quiet -c constraints.txt -e .
	.cache/core-venv/bin/python .ci/core_check.py --core

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
