# The two commands a newcomer needs: `make run` (the main job) and `make test` (the suite);
# `make test-fast` is the suite without the tests marked slow, for while you work.
# Each installs into .venv first (once, and again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PORT ?= 5000
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: install run test test-fast lint ui

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

run: install
	mlflow run . --env-manager local

lint: install
	ruff check .

# One pytest worker more than there are cores (at most 4): many tests wait on the processes
# they start (signals, servers, polls), and a third worker on two cores fills that time. Each
# test module runs on one worker, so its fixtures (trained heads, a finished study) are made
# once. The full suite lists its 25 slowest tests.
WORKERS = $(shell $(BIN)/python -c "import os; print(min(len(os.sched_getaffinity(0)) + 1, 4))")
PYTEST = python -m pytest --numprocesses $(WORKERS) --dist loadfile

test: lint
	$(PYTEST) --durations=25

test-fast: lint
	$(PYTEST) -m "not slow"

ui: install
	mlflow ui --host 127.0.0.1 --port $(PORT) --backend-store-uri sqlite:///mlflow.db
