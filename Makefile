# exai — two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: serve test lint bench bench-full services ts-sdk clean

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
test: $(TSTAMP) services ts-sdk lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(TSTAMP)
	$(BIN)/ruff check exai tests benchmarks
	$(BIN)/mypy exai

## The official TypeScript MCP SDK for tests/client/test_ts_sdk_http.py, outside the repository
## (that test skips, saying why, where npm is missing or the install fails).
NPM_DIR ?= $(HOME)/.cache/exai-tests/npm
TS_SDK  := @modelcontextprotocol/sdk@1.32.2
ts-sdk:
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "ts-sdk: npm not found; the TypeScript SDK test will be skipped"; \
	elif [ ! -f "$(NPM_DIR)/node_modules/@modelcontextprotocol/sdk/package.json" ]; then \
		mkdir -p "$(NPM_DIR)" && cd "$(NPM_DIR)" && npm install --no-audit --no-fund $(TS_SDK) \
		|| echo "ts-sdk: npm install failed; the TypeScript SDK test will be skipped"; \
	fi

## Make sure the loopback Postgres and Redis the tests use are up (starts them if down).
services:
	@sh scripts/ensure-services.sh

bench: $(TSTAMP)
	$(BIN)/python -m benchmarks run

bench-full: $(TSTAMP)
	$(BIN)/python -m benchmarks run --full

clean:
	rm -rf $(VENV) *.egg-info
