# The README's commands. Everything lives in .venv/ (made by `make setup`).
VENV ?= .venv
BIN := $(VENV)/bin
NP ?= 2
OUTPUT ?= output/digits

.PHONY: setup setup-run demo test test-fast lint format clean bench

setup:
	@bash scripts/setup.sh

# What `make demo` needs and no more: no test tools, no PostgreSQL or sshd (a later `make setup` adds them).
setup-run:
	@HARNESS_INSTALL=run bash scripts/setup.sh

# HARNESS_WITHOUT_HOROVOD=1 (a set-up for the torch backend alone, docs/setup.md): the demo runs on torchrun.
demo: setup-run
ifeq ($(HARNESS_WITHOUT_HOROVOD),1)
	$(BIN)/harness launch --backend torch -np $(NP) samples/digits --output $(OUTPUT)
else
	$(BIN)/horovodrun -np $(NP) -H localhost:$(NP) $(BIN)/harness samples/digits --output $(OUTPUT)
endif
	@echo "demo done: metrics in $(OUTPUT)/metrics.jsonl, effective config in $(OUTPUT)/config.yaml"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every tier (tests/conftest.py): unit, integration, container, multihost (gpu: skipped without CUDA); it
# prints the time of each tier at the end.
test: setup lint
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q --durations=15 tests

# The unit tier alone (in-process tests: no launcher, no subprocess), for the edit-run loop: about a minute.
test-fast: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -m unit tests/unit

# The benchmark (bench/README.md): installs the `bench` extra (Lightning, py-spy) with torch pinned to the
# installed version, then writes bench/RESULTS.md and bench/results.json (about 24 minutes on an idle
# 2-core machine).
bench: setup
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/bench-constraints.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[bench]' -c $(VENV)/bench-constraints.txt
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/run.py

# The image (README "Docker"), with `docker build` where a Docker engine runs, else buildah. Variables go
# to scripts/build_image.sh: FLAVOR=cpu (default gpu), IMAGE=tag, BASE_IMAGE=..., DEBIAN_BASE=1 (a Debian 12
# base made here from the apt mirror: no registry needed).
.PHONY: image test-container
image:
	bash scripts/build_image.sh

# The container tests alone (`make test` runs them too): builds both flavors, trains a sample inside them.
test-container: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q tests/container

clean:
	rm -rf $(VENV) output .pytest_cache .ruff_cache
