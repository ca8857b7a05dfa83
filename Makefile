# exai — two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: serve test lint bench bench-full services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[daemon]'
	touch $@

$(TSTAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e '.[daemon,test,bench]'
	touch $@

## Start the daemon on embedded defaults (no keys needed; it says how to add one).
serve: $(STAMP)
	$(BIN)/exai serve

## Lint (ruff with the ASYNC rules, mypy) and run the whole suite against local Postgres and Redis.
test: $(TSTAMP) services lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(TSTAMP)
	$(BIN)/ruff check exai tests benchmarks
	$(BIN)/mypy exai

## Make sure the loopback Postgres and Redis the tests use are up (starts them if down).
services:
	@sh scripts/ensure-services.sh

bench: $(TSTAMP)
	$(BIN)/python -m benchmarks run

bench-full: $(TSTAMP)
	$(BIN)/python -m benchmarks run --full

clean:
	rm -rf $(VENV) *.egg-info
