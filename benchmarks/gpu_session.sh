#!/usr/bin/env bash
# A GPU session in stages, so that a time-limited machine can run it one command per stage: environment, the gpu
# test tier, then every benchmark with the eager timer, CUDA-graph device time (--graph) and the profiler's kernel
# time and host enqueue time (--profile).
#
#   bash benchmarks/gpu_session.sh [STAGE ...]      # default: every stage, in this order
#
# Stages: info tests masking-mae masking-video loss attention e2e. Results go to benchmarks/results/ (and are
# copied to $OUT when that is set, e.g. on a machine that sends back only $OUT). Run from the repository root with
# torch and triton installed.
set -uo pipefail
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(info tests masking-mae masking-video loss attention e2e)
views=(--graph --profile)
status=0
for stage in "${stages[@]}"; do
    echo "=== stage $stage ($(date -u +%H:%M:%S))"
    case "$stage" in
        info)
            python3 -m mimfast.info 2>&1 | tee "$out/info.txt"
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 \
                | tee -a "$out/info.txt" ;;
        tests) python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -40 | tee "$out/gpu_tests.txt" ;;
        masking-mae) python3 -m benchmarks.bench_masking --cases mae_ "${views[@]}" ;;
        masking-video) python3 -m benchmarks.bench_masking --cases videomae_ "${views[@]}" ;;
        loss) python3 -m benchmarks.bench_loss "${views[@]}" ;;
        attention) python3 -m benchmarks.bench_attention "${views[@]}" ;;
        e2e) python3 -m benchmarks.bench_e2e --profile ;;
        *) echo "unknown stage $stage (info tests masking-mae masking-video loss attention e2e)"; status=2; continue ;;
    esac
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && { echo "stage $stage failed with status $rc"; status=1; }
done
if [ "$out" != "benchmarks/results" ]; then cp benchmarks/results/*.json benchmarks/results/*.md "$out"/ 2>/dev/null; fi
exit $status
