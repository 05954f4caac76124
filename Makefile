# The two commands: `make demo` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR ?= demo-output

.PHONY: install test lint typecheck unit demo server clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo,spark]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy --strict fhir_adapter $(wildcard server)

unit: install
	$(BIN)/pytest

test: lint typecheck
	$(BIN)/pytest --cov=fhir_adapter --cov-report=term

demo: install
	$(BIN)/fhir-adapter demo --out $(DEMO_DIR)

server: install
	$(BIN)/fhir-adapter test-server --port 8103

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache .coverage
