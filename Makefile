# repconv: `make install` then `make test`. Installs into .venv with the CPU build of torch pinned
# by constraints.txt (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ZOO_VENV := .venv-zoo
ZOO_BIN := $(ZOO_VENV)/bin

.PHONY: install test lint samples bench clean zoo-env zoo test-zoo

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,onnx]'
	@$(BIN)/repconv version >/dev/null && echo "installed: $$($(BIN)/python -c 'import torch; print("torch", torch.__version__)'), repconv in $(VENV)"

test:
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2

lint:
	$(BIN)/ruff check .

samples:
	$(BIN)/python -m repconv.samples.make sample_checkpoints

# deploy latency, conversion cost, numerical error: one run, saved to benchmarks/results_bench.md
bench:
	$(BIN)/python benchmarks/make_bench.py

# The timm model zoo (benchmarks/zoo.py, tests/zoo) runs in its own environment: PyPI's torch
# build with torchvision, timm and ultralytics pinned by constraints-zoo.txt. Those are installed
# once; repconv itself is installed again each time (4 s), so that a dependency pyproject gained
# since the env was made (isal) reaches it.
zoo-env:
	@if ! $(ZOO_BIN)/python -c 'import timm, torchvision, importlib.util as u; \
			assert u.find_spec("ultralytics")' 2>/dev/null; then \
		$(PYTHON) -m venv $(ZOO_VENV) && \
		$(ZOO_BIN)/pip install --quiet -c constraints-zoo.txt 'torch===2.13.0' torchvision timm \
			ultralytics; \
	fi
	$(ZOO_BIN)/pip install --quiet -c constraints-zoo.txt -e '.[dev,onnx]'
	@echo "$(ZOO_VENV) ready"

# OMP_WAIT_POLICY=PASSIVE: on a CPU shared with other work, OpenMP threads that spin at barriers
# make 2-thread runs 20-40x slower than 1-thread ones; sleeping waits keep them comparable.
zoo:
	OMP_WAIT_POLICY=PASSIVE $(ZOO_BIN)/python benchmarks/zoo.py

test-zoo:
	OMP_NUM_THREADS=1 $(ZOO_BIN)/python -m pytest -q -n 2 tests/zoo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
