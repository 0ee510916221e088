# The README's commands. Everything lives in .venv/ (made by `make setup`).
VENV ?= .venv
BIN := $(VENV)/bin
NP ?= 2
OUTPUT ?= output/digits

.PHONY: setup demo test lint format clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/horovodrun -np $(NP) -H localhost:$(NP) $(BIN)/harness samples/digits --output $(OUTPUT)
	@echo "demo done: metrics in $(OUTPUT)/metrics.jsonl, effective config in $(OUTPUT)/config.yaml"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: setup lint
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) output .pytest_cache .ruff_cache
