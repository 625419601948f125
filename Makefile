# Two commands for a newcomer: `make demo` and `make test` (both set up .venv first).
# TORCH can be overridden, e.g. for a CPU-only machine without this workplace's local wheel:
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.leadtune-installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/leadtune demo --out $(DEMO_DIR)

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/leadtune bench --model reference

clean:
	rm -rf $(VENV) runs
