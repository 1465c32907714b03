#!/usr/bin/env bash
# One pass on a GPU machine: environment, bf16/compiled-kernel tests, every benchmark, results gathered.
# Usage (repository root, torch + triton already installed): bash benchmarks/gpu_session.sh [OUT_DIR]
set -uo pipefail
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
python3 -m mimfast.info 2>&1 | tee "$out/info.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$out/info.txt"
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -40 | tee "$out/gpu_tests.txt"
python3 -m benchmarks.run_all --profile 2>&1 | tee "$out/bench_log.txt"
if [ "$out" != "benchmarks/results" ]; then cp benchmarks/results/*.json benchmarks/results/*.md "$out"/ 2>/dev/null; fi
