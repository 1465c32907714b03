# `make demo`: set up and train a small MAE on the embedded demo data.
# `make test`: set up and run the default (CPU) test tier, kernels through Triton's interpreter.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-gpu bench lint check-triton

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

# Every kernel at every benchmark shape compiled for sm_90 (no GPU needed) with each Triton of TRITON_VERSIONS:
# the oldest supported, 3.3 (its tl.gather lowering is one the kernels must keep away from) and the one the GPU
# machines run. Each goes to its own folder beside the venv's own Triton.
TRITON_VERSIONS ?= 3.0.0 3.3.1 3.6.0
check-triton: setup
	@for v in $(TRITON_VERSIONS); do \
	  dir=$(VENV)/triton-$$v; \
	  [ -d $$dir/triton ] || $(BIN)/pip install -q --no-deps --target $$dir "triton==$$v" || exit 1; \
	  echo "triton $$v:"; \
	  PYTHONPATH=$$PWD/$$dir:$$PWD $(BIN)/python -m benchmarks.kernel_report --no-save > $$dir/report.log 2>&1 \
	    || { tail -30 $$dir/report.log; exit 1; }; \
	  tail -1 $$dir/report.log; \
	done
