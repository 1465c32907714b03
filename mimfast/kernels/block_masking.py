"""Triton kernel for BEiT block-wise masking: one program per sample places the rectangles, completes the count
with single patches when they get stuck, and writes ids_keep, ids_restore and mask in one launch.

The rule is the one :func:`mimfast.ops.masking.block_masking_ref` runs on the host, in integer arithmetic only, so
both give the same masks for a seed:

- attempt slot t of sample s draws Philox4x32-10 words (r0, r1, r2, r3) from counters (t, s low 32 bits, s high 32
  bits, BLOCK_STREAM) under the 64-bit seed; outer round ``it`` owns slots it * ATTEMPTS .. it * ATTEMPTS + 9 and
  stops at its first rectangle that fits;
- area (in 2^-16 patches) = min_num * 2^16 + (budget - min_num) * (r0 >> 16); aspect and 1 / aspect (in 2^-16) from
  a table of log-uniform bin centres indexed by the top ASPECT_BITS of r1;
  h = round-half-up(sqrt(area * aspect)) = (isqrt((area_q * aspect_q) >> 30) + 1) // 2, w likewise with 1 / aspect;
- top = (r2 * (height - h + 1)) >> 32, left = (r3 * (width - w + 1)) >> 32;
- single patches: the unmasked patches with the smallest keys (Philox of (patch, s low, s high, FILL_STREAM), the
  patch index in the low key bits) complete the count.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from mimfast.kernels.sizes import next_pow2

INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)
LANES = tl.constexpr(16)  # Philox lanes per round: one per attempt slot (at least ATTEMPTS)


@triton.jit
def _isqrt(q):
    """floor(sqrt(q)) of a non-negative int64 below 2^40: the float estimate is within one, then made exact."""
    r = tl.sqrt(q.to(tl.float32)).to(tl.int64)
    r = tl.where((r + 1) * (r + 1) <= q, r + 1, r)
    return tl.where(r * r > q, r - 1, r)


@triton.jit
def _lane(x, lanes, i):
    """Element ``i`` of the [LANES] vector ``x`` as int64."""
    return tl.sum(tl.where(lanes == i, x.to(tl.int64), 0), 0)


# a fresh seed every call: specialising on its value would recompile at random
@triton.jit(do_not_specialize=["seed", "sample_offset"])
def block_masking_kernel(
    aspect_ptr,  # [2, 2^ASPECT_BITS] int64: aspect then 1 / aspect of each log-uniform bin, in units of 2^-16
    sample_ids_ptr,  # [N] int64: global index of each sample (read when HAS_IDS)
    ids_keep_ptr,  # [N, K] int64 out: kept patches, ascending
    ids_restore_ptr,  # [N, L] int64 out
    mask_ptr,  # [N, L] float out, 1 = removed
    seed,  # 64-bit Philox key
    sample_offset,  # global index of sample 0 (without HAS_IDS: sample n is sample_offset + n)
    height, width,  # patch grid, L = height * width
    K,  # kept patches per sample, L - num_masking_patches
    min_num, max_num,  # BEiT's min_num_patches and max_num_patches (rectangle area bounds)
    ATTEMPTS: tl.constexpr, ASPECT_BITS: tl.constexpr, BLOCK_STREAM: tl.constexpr, FILL_STREAM: tl.constexpr,
    IDX_BITS: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK: tl.constexpr,
):
    tl.static_assert(ATTEMPTS <= LANES, "one Philox lane per attempt slot")
    n = tl.program_id(0).to(tl.int64)
    L = height * width
    target = L - K
    offs = tl.arange(0, BLOCK)
    valid = offs < L
    row = offs // width
    col = offs % width
    if HAS_IDS:
        sample = tl.load(sample_ids_ptr + n).to(tl.int64)
    else:
        sample = sample_offset + n
    lanes = tl.arange(0, LANES)
    zeros = lanes.to(tl.uint32) * 0
    s_lo = zeros + (sample & 0xFFFFFFFF).to(tl.uint32)
    s_hi = zeros + (sample >> 32).to(tl.uint32)

    masked = tl.zeros([BLOCK], dtype=tl.int32)
    unit = tl.full([], 65536, tl.int64)  # 2^16: fixed-point one (an int64, whatever type min_num arrives as)
    count = tl.full([], 0, tl.int64)
    it = tl.full([], 0, tl.int64)
    go = count < target
    while go:
        budget = tl.minimum(target - count, max_num)
        # this round's attempt slots, one Philox lane each
        slot = (it * ATTEMPTS + lanes).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, slot, s_lo, s_hi, zeros + BLOCK_STREAM)
        added = tl.full([], 0, tl.int64)
        for a in tl.static_range(ATTEMPTS):
            area = min_num * unit + (budget - min_num) * (_lane(r0, lanes, a) >> 16)
            bin = _lane(r1, lanes, a) >> (32 - ASPECT_BITS)
            aspect = tl.load(aspect_ptr + bin)
            inverse = tl.load(aspect_ptr + (1 << ASPECT_BITS) + bin)
            h = (_isqrt((area * aspect) >> 30) + 1) // 2
            w = (_isqrt((area * inverse) >> 30) + 1) // 2
            fits = (h > 0) & (h < height) & (w > 0) & (w < width)
            top = (_lane(r2, lanes, a) * (height - h + 1)) >> 32
            left = (_lane(r3, lanes, a) * (width - w + 1)) >> 32
            rect = valid & (row >= top) & (row < top + h) & (col >= left) & (col < left + w)
            fresh = tl.sum(tl.where(rect & (masked == 0), 1, 0), 0).to(tl.int64)
            ok = fits & (fresh > 0) & (fresh <= budget) & (added == 0)
            masked = tl.where(rect & ok, 1, masked)
            added = tl.where(ok, fresh, added)
        count += added
        it += 1
        go = (added > 0) & (count < target)

    need = target - count
    if need > 0:
        # the rectangles got stuck: the unmasked patches with the smallest random keys complete the count
        c0 = offs.to(tl.uint32)
        c1 = c0 * 0 + (sample & 0xFFFFFFFF).to(tl.uint32)
        c2 = c0 * 0 + (sample >> 32).to(tl.uint32)
        f0, f1, _, _ = tl.philox(seed, c0, c1, c2, c0 * 0 + FILL_STREAM)
        rnd = (f0.to(tl.int64) << 31) | (f1 >> 1).to(tl.int64)
        key = ((rnd >> IDX_BITS) << IDX_BITS) | offs.to(tl.int64)
        key = tl.where(valid & (masked == 0), key, INT64_MAX)
        ordered = tl.sort(key)
        threshold = tl.sum(tl.where(offs == need - 1, ordered, 0), 0)
        masked = tl.where(key <= threshold, 1, masked)

    kept = valid & (masked == 0)
    removed = valid & (masked != 0)
    kept_rank = tl.cumsum(kept.to(tl.int32), 0) - 1
    removed_rank = tl.cumsum(removed.to(tl.int32), 0) - 1 + K
    idx = offs.to(tl.int64)
    row_base = n * L
    tl.store(ids_keep_ptr + n * K + kept_rank, idx, mask=kept)
    tl.store(ids_restore_ptr + row_base + idx, tl.where(kept, kept_rank, removed_rank).to(tl.int64), mask=valid)
    tl.store(mask_ptr + row_base + idx, removed.to(mask_ptr.dtype.element_ty), mask=valid)


def launch_block_masking(
    ids_keep: torch.Tensor,
    ids_restore: torch.Tensor,
    mask: torch.Tensor,
    aspect_table: torch.Tensor,
    sample_ids: "torch.Tensor | None" = None,
    *,
    height: int,
    width: int,
    min_num_patches: int,
    max_num_patches: int,
    seed: int,
    sample_offset: int,
    attempts: int,
    block_stream: int,
    fill_stream: int,
    index_bits: int,
) -> None:
    """Fill the preallocated outputs (ids_keep [N, K] fixes K, ids_restore [N, L] fixes N) in one launch; sample n
    draws from global index ``sample_ids[n]`` ([N] int64 on the outputs' device) when given, else sample_offset + n."""
    N, L = ids_restore.shape
    K = ids_keep.shape[1]
    if N == 0:
        return
    block = max(16, next_pow2(L))
    aspect_bits = (aspect_table.shape[1] - 1).bit_length()
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    with torch.cuda.device(ids_restore.device) if ids_restore.is_cuda else contextlib.nullcontext():
        block_masking_kernel[(N,)](
            aspect_table, aspect_table if sample_ids is None else sample_ids, ids_keep, ids_restore, mask, seed,
            sample_offset, height, width, K,
            min_num_patches, max_num_patches,
            ATTEMPTS=attempts, ASPECT_BITS=aspect_bits, BLOCK_STREAM=block_stream, FILL_STREAM=fill_stream,
            IDX_BITS=index_bits, HAS_IDS=sample_ids is not None, BLOCK=block, num_warps=num_warps,
        )
