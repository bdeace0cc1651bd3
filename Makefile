# Entry points for people and CI. Every target sets up .venv first (scripts/setup.sh, idempotent).
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo-sst2-lora
# the run layer: its internals (launch/run/) and its front doors (launch/*.py but the CLI): pyproject.toml's contract
RUN_LAYER := launch/run $(filter-out launch/cli.py,$(wildcard launch/*.py))

.PHONY: setup demo test test-unit test-slow test-all lint wheel-check bench clean catalogue

setup:
	@./scripts/setup.sh

# The embedded demo: pretrained MiniLM + the bundled sentiment set, LoRA, then scored before/after.
demo: setup
	$(BIN)/ftctl train --task sst2 --method lora --output-dir $(DEMO_DIR) --overwrite
	$(BIN)/ftctl evaluate $(DEMO_DIR) --baseline

# The default suite (what CI runs): fast tests, no network, no GPU.
test: setup
	$(BIN)/python -m pytest -n 2 -q

# The unit tier alone (no training; under two minutes): tests/conftest.py's UNIT_MODULES
test-unit: setup
	$(BIN)/python -m pytest -n 2 -q -m unit

# Slow tests: multi-process and real-model checks.
# (--dist loadfile: a file's tests share a worker, so the executor tests, each a grid of cells side by side, run one
# at a time and their module fixture is computed once. Not loadgroup: under pytest 9 with xdist 3.8 it groups nothing)
test-slow: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile -q -m slow

test-all: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile -q -m "slow or not slow"

# ruff; the layer contract (import-linter, pyproject.toml); the type checker over the kernel, the run layer and the studies
lint: setup
	$(BIN)/ruff check ftctl launch tasks methods tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy ftctl $(RUN_LAYER) launch/studies

# The README's and docs' task and method tables, rewritten from the registries (tests/kernel/test_docs.py checks them)
catalogue: setup
	$(BIN)/ftctl list --update README.md docs/tasks.md docs/methods.md

# The wheel installed in a fresh virtualenv works from any directory (scripts/wheel_check.sh).
wheel-check: setup
	./scripts/wheel_check.sh

bench: setup
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) runs .pytest_cache
