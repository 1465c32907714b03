#!/usr/bin/env bash
# A GPU session in stages, so that a time-limited machine can run it one command per stage: environment, the gpu
# test tier, then every benchmark with the eager timer, CUDA-graph device time (--graph) and the profiler's kernel
# time and host enqueue time (--profile).
#
#   bash benchmarks/gpu_session.sh [STAGE ...]      # default: every stage below, in this order
#
# A stage is info, tests[:FILE] (the gpu tier, or one test file's gpu tests), BENCH[:CASES] with BENCH one of
# masking, loss, attention, e2e and CASES a comma-separated list of case-name substrings (benchmarks' --cases), or
# sweep:NAME with NAME one of loss, restore, embed, gather, attention (benchmarks.sweep over the open kernel
# settings, rows to sweep_<name>.json).
# Each benchmark stage appends one run to benchmarks/results/<bench>.json and .md, and streams its rows to
# <bench>.partial.jsonl while it runs (kept when a time limit stops the stage). When $OUT is set (a machine that
# sends back only $OUT, and few files of it), the results, the partial files and every stage's full log
# (<stage>.log) are packed after each stage into the one archive $OUT/gpu_session.tar.gz (unpack it over
# benchmarks/results/, then draw the pictures with `python -m benchmarks.plot`). Run from the repository root with torch and triton installed. Results name the commit from
# $MIMFAST_COMMIT, else from git (with -dirty for edited tracked files): set it on a machine whose copy of the
# tree has no git history.
set -uo pipefail
out=benchmarks/results
if [ -n "${OUT:-}" ]; then
    out=$(mktemp -d /tmp/gpu_session.XXXXXX)  # packed into $OUT after each stage
    mkdir -p "$OUT"
fi
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
if [ -z "${MIMFAST_COMMIT:-}" ] && commit=$(git rev-parse --short HEAD 2>/dev/null); then
    [ -n "$(git status --porcelain --untracked-files=no -- mimfast 'benchmarks/*.py' csrc 2>/dev/null)" ] \
        && commit="$commit-dirty"
    export MIMFAST_COMMIT="$commit"
fi
echo "commit ${MIMFAST_COMMIT:-unknown}"
save() {  # results so far, as one archive in $OUT when the machine sends back only that
    if [ "$out" != "benchmarks/results" ]; then
        cp benchmarks/results/*.json benchmarks/results/*.md benchmarks/results/*.partial.jsonl "$out"/ 2>/dev/null
        tar -czf "$out.tar.gz" -C "$out" . && cp "$out.tar.gz" "$OUT/gpu_session.tar.gz"
    fi
    return 0
}
stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then
    # Most telling first, for a session whose device time may run out: the gpu tests of the kernels that changed
    # since the last GPU run, the sweeps of their open settings, then the ViT-B and VideoMAE-B shapes the issues'
    # targets were measured at, the whole gpu tier, end to end, and last the larger shapes.
    stages=(info tests:test_masked_pixel_loss.py tests:test_videomae_pixel_loss.py tests:test_restore_tokens.py
            tests:test_embed_visible.py tests:test_gather_patches.py tests:test_visible_attention.py
            sweep:embed sweep:loss sweep:restore sweep:gather sweep:attention
            loss:mae_vit_b16 loss:videomae masking:mae_vit_b16
            attention:mae_vit_b16_enc,mae_vit_l16_enc attention:mae_enc_50,vit_197,mae_dec_197 attention:videomae_dec_1568
            tests e2e:mae_vit_b16 masking:videomae_b16
            loss:mae_vit_l16,mae_vit_h14 masking:mae_vit_l16 masking:mae_vit_h14 e2e:mae_vit_l16)
fi
status=0
for stage in "${stages[@]}"; do
    name="${stage%%:*}"
    arg=""
    [ "$name" != "$stage" ] && arg="${stage#*:}"
    log="$out/$(echo "$stage" | tr -c 'A-Za-z0-9_.-' '_' | sed 's/_*$//').log"  # a file name from the stage
    echo "=== stage $stage ($(date -u +%H:%M:%S))"
    case "$name" in
        info)
            { python3 -m mimfast.info; } 2>&1 | tee "$out/info.txt"
            rc=${PIPESTATUS[0]}
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 \
                | tee -a "$out/info.txt" ;;
        tests)
            # the whole log to the file (a stage stopped part-way keeps what ran), its end on screen
            target="tests${arg:+/$arg}"
            python3 -m pytest -q -m gpu "$target" -p no:cacheprovider > "$log" 2>&1
            rc=$?
            tail -40 "$log" ;;
        masking|loss|attention)
            python3 -m "benchmarks.bench_$name" ${arg:+--cases "$arg"} --graph --profile 2>&1 | tee "$log"
            rc=${PIPESTATUS[0]} ;;
        e2e)
            python3 -m benchmarks.bench_e2e ${arg:+--cases "$arg"} --profile 2>&1 | tee "$log"
            rc=${PIPESTATUS[0]} ;;
        sweep)
            case "$arg" in
                loss) sweep=(bench_loss --cases mae_vit_b16/,mae_vit_h14/,videomae_b/
                             --set mimfast.kernels.pixel_loss.TRANSPOSE=False,True
                             --set mimfast.kernels.pixel_loss.LOSS_WARPS=4,8
                             --set mimfast.kernels.pixel_loss.LATE_PRED=False,True
                             --set mimfast.kernels.pixel_loss.CHANNEL_SUMS=False,True) ;;
                restore) sweep=(bench_masking --cases /restore
                                --set mimfast.kernels.restore_tokens.FLAT_BLOCK_R=32,64
                                --set mimfast.ops.restore_tokens.BWD_PROGRAMS_PER_SM=3,6
                                --set mimfast.kernels.restore_tokens.BWD_PREFETCH=False,True) ;;
                embed) sweep=(bench_masking --cases mask+embed
                              --set mimfast.ops.embed_visible.WEIGHT_GRAD_VIA_GEMM=False,True) ;;
                gather) sweep=(bench_masking --cases "gather fwd"
                               --set mimfast.kernels.gather_patches.TRANSPOSE=False,True
                               --set mimfast.kernels.gather_patches.GATHER_TILE=2048,4096,8192
                               --set mimfast.kernels.gather_patches.GATHER_WARPS=4,8) ;;
                attention) sweep=(bench_attention --cases 'vit_197/H12/fwd$,mae_dec_197/H16/fwd$,videomae_dec_1568/H12/fwd$'
                                  --set mimfast.kernels.visible_attention.FWD_BLOCK_M=64,128
                                  --set mimfast.kernels.visible_attention.FWD_BLOCK_N=32,64
                                  --set mimfast.kernels.visible_attention.FWD_STAGES=2,3
                                  --set mimfast.kernels.visible_attention.FWD_NARROW_TAIL=False,True) ;;
                *) echo "unknown sweep '$arg' (loss, restore, embed, gather, attention)"; status=2; continue ;;
            esac
            python3 -m benchmarks.sweep "${sweep[@]}" --out "$out/sweep_$arg.json" 2>&1 | tee "$log"
            rc=${PIPESTATUS[0]} ;;
        *) echo "unknown stage $stage (info, tests[:FILE], masking|loss|attention|e2e[:CASES], sweep:NAME)"
           status=2; continue ;;
    esac
    [ "$rc" -ne 0 ] && { echo "stage $stage failed with status $rc"; status=1; }
    save
    echo "=== stage $stage done ($(date -u +%H:%M:%S))"
done
save
exit $status
