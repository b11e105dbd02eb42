# Quick start: `make run` (set up + run the default pipeline on the embedded digits data),
#              `make test` (set up + run the test suite; CI runs exactly this).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE :=
# Ray/MLflow environment defaults: pipeline/env.py, applied by pipeline/run.py, tests/conftest.py
# and benchmarks/pipeline_overhead.py before they import ray (none are needed here).

# --no-compile: pip would byte-compile every installed file (torch, ray, mlflow: 271 s against
# 157 s without, measured); Python compiles what is imported on first use instead (about 24 s
# for the whole stack), since PYTHONDONTWRITEBYTECODE is cleared above.

.PHONY: setup run test bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --no-compile -e ".[test]"
	touch $@

run: setup
	$(PY) pipeline/run.py $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/search_step.py
	$(PY) benchmarks/adv_train_step.py
	$(PY) benchmarks/pipeline_overhead.py

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
