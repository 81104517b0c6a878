# Two entry points (see README): `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYPROJECT := $(shell sha1sum pyproject.toml | cut -c1-12)
# Two stamps: `make demo` installs what the demo runs (train, serve); `make test` adds the dev tools.
DEMO_STAMP := $(VENV)/.installed-demo-$(PYPROJECT)
DEV_STAMP := $(VENV)/.installed-dev-$(PYPROJECT)
PIP := $(BIN)/python -m pip install --progress-bar on
# The CPU wheel of torch 2.13.0, found locally on the project machines. Elsewhere, plain PyPI serves a CUDA build
# on Linux: make demo TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'
TORCH_PIP_ARGS ?=

$(DEMO_STAMP): pyproject.toml
	@echo "== installing torch 2.13.0 (CPU) and the demo's packages (.[train,serve]) into $(VENV): about 70 s from local wheels on 2 cores, longer where pip downloads (it lists each package)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PIP) -e '.[train,serve]'
	rm -f $(VENV)/.installed-demo-* && touch $(DEMO_STAMP)

$(DEV_STAMP): $(DEMO_STAMP)
	@echo "== installing the test and lint tools (.[dev]) into $(VENV)"
	$(PIP) -e '.[train,serve,dev]'
	rm -f $(VENV)/.installed-dev-* && touch $(DEV_STAMP)

install: $(DEV_STAMP)

## Main job: prepare the default data, train, export a bundle, serve it on http://127.0.0.1:8000.
## A re-run serves the bundle it made before; `make demo DEMO_ARGS=--retrain` trains again (`mmrec demo --help`).
DEMO_ARGS ?=
demo: $(DEMO_STAMP)
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
