# Two commands a newcomer needs: `make run` and `make test`. Each creates or refreshes .venv first.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export RAY_USAGE_STATS_ENABLED ?= 0
export DO_NOT_TRACK ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv run test test-slow bench bench-smoke clean

venv: $(STAMP)

# torch goes in first and alone: `torch==2.13.0` is the CPU build; any other spec may pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: venv
	$(BIN)/many run

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

bench: venv
	$(BIN)/python -m benchmarks.all

bench-smoke: venv
	$(BIN)/python -m benchmarks.all --smoke

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
