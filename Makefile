# Two entry points (see README): `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install demo test lint typecheck results clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel of torch 2.13.0 (local on the project machines); a looser pin would pull a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[train,serve,dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

## Main job: prepare the default data, train, export a bundle, serve it on http://127.0.0.1:8000.
## A re-run serves the bundle it made before; `make demo DEMO_ARGS=--retrain` trains again (`mmrec demo --help`).
DEMO_ARGS ?=
demo: install
	$(BIN)/mmrec demo $(DEMO_ARGS)

## Test suite (unit, numerical, integration with real Redis and real HTTP)
test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check models training service tests bench

typecheck: install
	$(BIN)/mypy

results: install
	$(BIN)/mmrec results

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
