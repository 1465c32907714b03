# `make demo`: set up and train a small MAE on the embedded demo data.
# `make test`: set up and run the default (CPU) test tier, kernels through Triton's interpreter.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-gpu bench lint

$(BIN)/.installed: setup.py pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,demo,bench]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m mimfast.pretrain

test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

bench: setup
	$(BIN)/python -m benchmarks.run_all

lint: setup
	$(BIN)/ruff check mimfast tests benchmarks
