# repconv: `make install` then `make test`. Installs into .venv with the CPU build of torch pinned
# by constraints.txt (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint samples bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@$(BIN)/repconv version >/dev/null && echo "installed: $$($(BIN)/python -c 'import torch; print("torch", torch.__version__)'), repconv in $(VENV)"

test:
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2

lint:
	$(BIN)/ruff check .

samples:
	$(BIN)/python -m repconv.make_samples sample_checkpoints

bench:
	$(BIN)/python benchmarks/deploy_speed.py
	$(BIN)/python benchmarks/conversion_cost.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
