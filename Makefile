# Thin wrappers; the work happens in dev/stemflow_dev (python -m stemflow_dev ...).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install up down demo test test-unit test-integration test-images images lint format contract models bench clean

$(STAMP): constraints.txt requirements-dev.txt shared/pyproject.toml dev/pyproject.toml $(wildcard services/*/pyproject.toml)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)
	dev/system-deps.sh

up: install
	$(BIN)/python -m stemflow_dev up

down:
	$(BIN)/python -m stemflow_dev down

demo: install
	$(BIN)/python -m stemflow_dev demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

test-integration: install
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

# The five service images (stand-in base images where none can be pulled; docs/deploy.md), then their sizes.
images: install
	nice -n 10 $(BIN)/python -m stemflow_dev.images build $(IMAGES_ARGS)

# The images as containers against real servers: skipped unless an engine answers and the images exist.
test-images: install
	$(BIN)/python -m pytest tests/images -m images $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The event contract for other teams (docs/events/): JSON Schemas and AsyncAPI, generated from the event models.
contract: install
	$(BIN)/python -m stemflow_dev.contract write

models: install
	$(BIN)/python -m stemflow_dev.models download --repo .models

bench: install
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf $(VENV) .stemflow test-artifacts
