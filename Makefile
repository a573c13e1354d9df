# attention-apps: install / demo / test / lint / bench.
# VENV (default .venv) and PYTHON (default python3) can be set from the environment.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Test workers (pytest-xdist), one torch thread each: on few cores, many small ops run
# far faster single-threaded than with threads waiting on each other.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS)
export VENV PYTHON

.PHONY: install demo test test-fast lint format bench clean

install:
	@scripts/install.sh

demo: install
	$(BIN)/attn-demo --out demo-out

test: install
	$(PYTEST) -m "not gpu"

test-fast: install
	$(PYTEST) -m "not gpu and not slow"

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
