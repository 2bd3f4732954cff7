# Two commands a newcomer needs: `make demo` (the main job end to end) and `make test`.
# Each bootstraps .venv from requirements.lock on first use; only python3 (3.11+) is required.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HEMA_HOME ?= $(CURDIR)/.hema
export DAGSTER_HOME ?= $(HEMA_HOME)/dagster_home
export GX_ANALYTICS_ENABLED := false
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo demo-pbc test test-e2e lint format check ui benchmarks clean lock

$(BIN)/hema: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
	$(BIN)/uv pip install --quiet -p $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet -p $(BIN)/python --no-deps -e .
	touch $(BIN)/hema

demo: $(BIN)/hema
	$(BIN)/hema demo

demo-pbc: $(BIN)/hema
	$(BIN)/hema demo --pbc

# The default suite: every test but the end-to-end ones. --durations: the slowest tests, so the suite's
# cost stays visible in every CI log.
test: $(BIN)/hema
	$(BIN)/python -m pytest -q -m "not end_to_end" --durations=25

# End to end, as a user runs it: `hema demo` from nothing, and the real daemon (`dagster dev`: sensors, queue,
# pools, run monitoring, kill -9 recovery, PHI through its logs, the UI in Chromium). One at a time: these
# wait on the daemon's clocks and time its runs. CI runs them after `make test`.
test-e2e: $(BIN)/hema
	$(BIN)/python -m pytest -q -m end_to_end --durations=15

# The gates: lint, formatting and types (seconds). .ci/run runs them before the tests.
lint: $(BIN)/hema
	$(BIN)/ruff check hema_pipeline hema_pipeline_tests benchmarks
	$(BIN)/ruff format --check hema_pipeline hema_pipeline_tests benchmarks
	$(BIN)/mypy

format: $(BIN)/hema
	$(BIN)/ruff check --fix hema_pipeline hema_pipeline_tests benchmarks
	$(BIN)/ruff format hema_pipeline hema_pipeline_tests benchmarks

# The fast loop while working: the gates and every test not marked slow or shared_data (nothing that trains a network,
# starts a server or reads the real images).
check: lint
	$(BIN)/python -m pytest -q -n auto -m "not slow and not shared_data" -p no:cacheprovider

ui: $(BIN)/hema
	mkdir -p $(DAGSTER_HOME) && cp -n dagster.yaml $(DAGSTER_HOME)/dagster.yaml || true
	HEMA_DEMO=1 $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

benchmarks: $(BIN)/hema
	$(BIN)/python benchmarks/import_throughput.py

lock:
	uv pip compile pyproject.toml --extra test --extra scale -p 3.11 -o requirements.lock

clean:
	rm -rf .hema
