# attention-apps: install / demo / test / lint / bench.
# VENV (default .venv) and PYTHON (default python3) can be set from the environment.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export VENV PYTHON

.PHONY: install demo test test-fast lint format bench clean

install:
	@scripts/install.sh

demo: install
	$(BIN)/attn-demo --out demo-out

test: install
	$(BIN)/python -m pytest -m "not gpu"

test-fast: install
	$(BIN)/python -m pytest -m "not gpu and not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	@scripts/run-benchmarks.sh "$(BIN)/python"

clean:
	rm -rf demo-out .pytest_cache .ruff_cache
