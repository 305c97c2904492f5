# G-AIGateway: `make run` starts the gateway, `make test` runs every test. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run test lint venv dev-venv redis bench bench-cache bench-new bench-instructions eval chaos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUNTIME_STAMP): requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@ $(RUNTIME_STAMP)

venv: $(RUNTIME_STAMP)
dev-venv: $(DEV_STAMP)

redis:
	@bash tools/ensure_redis.sh

## Set up and start the gateway under gunicorn (with the bundled mock upstream when no upstream key is set).
run: venv redis
	@bash tools/run_dev.sh

## Set up and run the whole suite: lint, unit, integration (real Redis, real gunicorn), end-to-end (openai SDK).
test: dev-venv redis
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: dev-venv
	$(BIN)/ruff check .

bench: dev-venv redis
	$(BIN)/python tools/bench.py proxy $(BENCH_ARGS)

bench-cache: dev-venv redis
	$(BIN)/python tools/bench.py cache

bench-new: dev-venv redis
	$(BIN)/python tools/bench.py new-prompts

bench-instructions: dev-venv
	$(BIN)/python tools/bench.py instructions $(BENCH_ARGS)

## The fault suite (issue 12): Redis, upstream, worker and client faults against a real gunicorn; prints one table.
chaos: dev-venv
	$(BIN)/python tools/chaos.py $(CHAOS_ARGS)

eval: dev-venv
	$(BIN)/python tools/eval_semantic.py

clean:
	rm -rf $(VENV) .run .pytest_cache .ruff_cache
