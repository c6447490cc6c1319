# Quick start: `make demo` and `make test`. Both create .venv in the repo root on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,torch,airflow]'
	touch $(STAMP)

demo: $(STAMP)
	scripts/demo.sh

test: $(STAMP) lint
	scripts/install-test-tools.sh
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_planner
	$(BIN)/python -m benchmarks.bench_orchestration

clean:
	rm -rf $(VENV) build *.egg-info
