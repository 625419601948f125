# Two commands for a newcomer: `make demo` and `make test` (both set up .venv first).
# TORCH can be overridden, e.g. for a CPU-only machine without this workplace's local wheel:
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.leadtune-installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-faults lint typecheck bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
# (setuptools' "Editable installation ... folders with the same name as your package" notice
# is about the leadtune/ folder that is the package itself: nothing to act on, so not shown)
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -e ".[dev]"
# Build the fused CPU kernels now (about 35 s) rather than in the first training run;
# without a C++ compiler this warns and leadtune uses its slower PyTorch code path.
	$(BIN)/python -c "from leadtune.trainables.lead_id.models import kernels; kernels.load()"
# A static import path (build/static-path) that pyright, Pylance and mypy can follow: see
# leadtune/static_path.py.
	$(BIN)/python -m leadtune.static_path
	touch $(STAMP)

# The main job on the bundled sample: a 2-trial search that finds a working lead-ID model, every
# trial in MLflow, the best model evaluated once on the test split and registered as
# lead-id@champion, then used to label a record.
demo: setup
	$(BIN)/leadtune search --space demo --trials 2 --max-concurrent 2 \
	    --storage-path $(DEMO_DIR)
	$(BIN)/leadtune label data/ptbxl-sample/records100/00000/00001_lr \
	    --model models:/lead-id@champion --tracking-uri sqlite:///$(abspath $(DEMO_DIR))/mlflow.db \
	    || [ $$? -eq 1 ]  # exit status 1: labelled, a swap suspected (not a failure)

test: setup
	$(BIN)/pyright
	$(BIN)/python -m pytest -q tests

# Every import resolves (leadtune.* through build/static-path); also the first step of `test`.
typecheck: setup
	$(BIN)/pyright

# Every fault-injection case (docs/faults.md), the slow ones included: about 22 min on 2 cores
# shared with other work. CI runs it after `make test` (.ci/run).
test-faults: setup
	LEADTUNE_SLOW_TESTS=1 $(BIN)/python -m pytest -q tests/test_faults.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/leadtune bench --model reference

# On a CUDA machine: bf16 vs fp32 training of the reference, ECG/s, peak memory, and a 4-trial
# search sharing one GPU (a few minutes).
gpu-check: setup
	$(BIN)/python -m leadtune.gpu_check

clean:
	rm -rf $(VENV) runs
