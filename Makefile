# Quick start: `make demo` and `make test`. Both create .venv in the repo root on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The Airflow release an MWAA environment runs (`make mwaa AIRFLOW_VERSION=3.3.x`): the one constraints.txt pins.
AIRFLOW_VERSION ?= $(shell sed -n 's/^apache-airflow==//p' constraints.txt)

.PHONY: demo test lint bench mwaa clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,torch,airflow]'
	# The editable install's build leaves egg-info in the repo root: with the root on a PYTHONPATH
	# (as the tests put it, for their trainables) it reads as a second copy of the package.
	rm -rf rubberband_airflow.egg-info
	touch $(STAMP)

demo: $(STAMP)
	scripts/demo.sh

# Two workers, each module on one of them, the slowest modules first (in tests/conftest.py's order:
# xdist would start with the modules of the most tests); then the tests that time trials against
# limits and deadlines, alone (marked `serial`). Each run fails if it collects no test.
test: $(STAMP) lint
	scripts/install-test-tools.sh
	$(BIN)/python -m pytest -n 2 --dist loadgroup --no-loadscope-reorder -m "not serial"
	$(BIN)/python -m pytest -m serial

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_planner
	$(BIN)/python -m benchmarks.bench_replan
	$(BIN)/python -m benchmarks.bench_spot
	$(BIN)/python -m benchmarks.bench_orchestration
	$(BIN)/python -m benchmarks.bench_scale
	$(BIN)/python -m benchmarks.bench_calibration

# dist/mwaa/: plugins.zip (the plugin module, the package's wheel, constraints) and requirements.txt
# for Amazon MWAA; docs/user-guide.md, "Deploy to Amazon MWAA".
mwaa: $(STAMP)
	$(BIN)/python scripts/mwaa_bundle.py --airflow-version '$(AIRFLOW_VERSION)'

clean:
	rm -rf $(VENV) build dist *.egg-info
