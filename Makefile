# exai — two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: serve test lint bench bench-full services ts-sdk clean

# Each step says what it does before it starts, so a quiet pip does not look like a hang.
# INSTALL_QUIET: pip's errors only (-qq); a single -q still shows setuptools' warnings about an
# editable install, a screenful of "!!" that a first run does not need.
INSTALL_QUIET ?= --quiet --quiet
$(BIN)/python:
	@echo "make: creating the virtualenv $(VENV) with $(PYTHON)"
	@$(PYTHON) -m venv $(VENV)
	@echo "make: upgrading pip in $(VENV)"
	@$(BIN)/pip install $(INSTALL_QUIET) --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	@echo "make: installing exai and its dependencies into $(VENV) (pip; about 30 s the first time)"
	@$(BIN)/pip install $(INSTALL_QUIET) -e '.[daemon]'
	@touch $@
	@echo "make: installed"

$(TSTAMP): pyproject.toml $(STAMP)
	@echo "make: installing the test and benchmark extras into $(VENV) (pip; about 30 s the first time)"
	@$(BIN)/pip install $(INSTALL_QUIET) -e '.[daemon,test,bench]'
	@touch $@
	@echo "make: installed"

## Start the daemon on embedded defaults (no keys needed; it says how to add one).
serve: $(STAMP)
	@echo "make: starting the daemon: $(BIN)/exai serve (Ctrl-C stops it)"
	@$(BIN)/exai serve

## Lint (ruff with the ASYNC rules, mypy) and run the whole suite against local Postgres and Redis.
## PYTEST_WORKERS: pytest-xdist processes (2, the CI box's cores; 0 runs it in this process).
## The tests tests/conftest.py names in ONE_AT_A_TIME run one at a time, on one worker.
PYTEST_WORKERS ?= 2
test: $(TSTAMP) services ts-sdk lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

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
