"""Triton kernel for random masking: one program per sample builds sort keys, sorts them on chip (bitonic
``tl.sort``) and writes ids_keep, ids_restore and mask in a single launch.

Keys are int64 with the patch index in the low ``IDX_BITS`` bits, so every key in a row is distinct and the
ascending order of the keys is a permutation that breaks ties by patch index (the order of a stable argsort).

- With noise: the high 32 bits are the noise value mapped to an int32 whose signed order is the float order
  (-0.0 folded onto +0.0, as ``torch.argsort`` compares them equal; 16-bit noise straight from its bits) and
  ``IDX_BITS`` is 32.
- Without noise: the high bits are Philox4x32-10 random bits; counters (patch index, global sample index low
  32 bits, global sample index high 32 bits, 0), key = the 64-bit seed. ``mimfast.ops.random_masking.philox4x32``
  computes the same bits with torch integer ops.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from mimfast.kernels.sizes import next_pow2

INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)


# a fresh seed every call: specialising on its value (divisibility, == 1) would recompile at random
@triton.jit(do_not_specialize=["seed", "sample_offset"])
def random_masking_kernel(
    noise_ptr,  # [N, L] float32/float16/bfloat16 noise (read only when HAS_NOISE)
    ids_keep_ptr,  # [N, K] int64 out, or [T] int64 packed by cu_seqlens when RAGGED
    ids_restore_ptr,  # [N, L] int64 out
    mask_ptr,  # [N, L] float out, 1 = removed
    num_keep_ptr,  # [N] int64 kept count per sample (read only when RAGGED)
    cu_seqlens_ptr,  # [N + 1] int32 packed row starts (read only when RAGGED)
    seed,  # 64-bit Philox key (used only without noise)
    sample_offset,  # global index of sample 0 (used only without noise)
    L,
    K,  # kept count shared by every sample (ignored when RAGGED)
    stride_noise_n,
    stride_noise_l,
    HAS_NOISE: tl.constexpr,
    HALF_NOISE: tl.constexpr,  # the noise is 16-bit (fp16 or bf16)
    RAGGED: tl.constexpr,
    IDX_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < L
    idx = offs.to(tl.int64)
    if HAS_NOISE:
        x = tl.load(noise_ptr + n * stride_noise_n + idx * stride_noise_l, mask=valid, other=0.0)
        if HALF_NOISE:
            # fp16 / bf16 ordered by their bit patterns, with no conversion to fp32 (Triton's interpreter flushes
            # bf16 subnormals to zero when it converts): a value is its sign and 15 magnitude bits
            bits = x.to(tl.int16, bitcast=True).to(tl.int32)
            magnitude = bits & 0x7FFF
            bits = tl.where(bits < 0, -1 - magnitude, magnitude)
            bits = tl.where(magnitude == 0, 0, bits)
        else:
            x = x.to(tl.float32)
            bits = x.to(tl.int32, bitcast=True)
            # negative floats grow in magnitude as their bit pattern grows: flip the 31 value bits to reverse them
            bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
            bits = tl.where(x == 0.0, 0, bits)
        key = (bits.to(tl.int64) << 32) | idx
    else:
        sample = sample_offset + n
        c0 = offs.to(tl.uint32)
        c1 = (c0 * 0) + (sample & 0xFFFFFFFF).to(tl.uint32)
        c2 = (c0 * 0) + (sample >> 32).to(tl.uint32)
        c3 = c0 * 0
        r0, r1, _, _ = tl.philox(seed, c0, c1, c2, c3)
        # 63 random bits (non-negative as int64), low IDX_BITS of them replaced by the patch index
        rnd = (r0.to(tl.int64) << 31) | (r1 >> 1).to(tl.int64)
        key = ((rnd >> IDX_BITS) << IDX_BITS) | idx
    key = tl.where(valid, key, INT64_MAX)
    key = tl.sort(key)
    ids_shuffle = key & ((1 << IDX_BITS) - 1)

    if RAGGED:
        k = tl.load(num_keep_ptr + n).to(tl.int64)
        keep_base = tl.load(cu_seqlens_ptr + n).to(tl.int64)
    else:
        k = K
        keep_base = n * K
    row = n * L
    tl.store(ids_keep_ptr + keep_base + idx, ids_shuffle, mask=idx < k)
    tl.store(ids_restore_ptr + row + ids_shuffle, idx, mask=valid)
    removed = (idx >= k).to(mask_ptr.dtype.element_ty)
    tl.store(mask_ptr + row + ids_shuffle, removed, mask=valid)


def launch_random_masking(
    ids_keep: torch.Tensor,
    ids_restore: torch.Tensor,
    mask: torch.Tensor,
    *,
    noise: Optional[torch.Tensor] = None,
    num_keep: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    seed: int = 0,
    sample_offset: int = 0,
    K: int = 0,
    index_bits: int = 4,
) -> None:
    """Fill the preallocated outputs (ids_restore [N, L] fixes N and L) in one launch.

    ``index_bits``: low key bits holding the patch index for Philox keys (2**index_bits >= L).
    """
    N, L = ids_restore.shape
    if N == 0:
        return
    block = max(16, next_pow2(L))
    has_noise = noise is not None
    idx_bits = 32 if has_noise else index_bits
    ragged = num_keep is not None
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    # triton launches on the current CUDA device: make it the outputs' device
    with torch.cuda.device(ids_restore.device) if ids_restore.is_cuda else contextlib.nullcontext():
        random_masking_kernel[(N,)](
            noise if has_noise else ids_restore,
            ids_keep,
            ids_restore,
            mask,
            num_keep if ragged else ids_restore,
            cu_seqlens if ragged else ids_restore,
            seed,
            sample_offset,
            L,
            K,
            noise.stride(0) if has_noise else 0,
            noise.stride(1) if has_noise else 0,
            HAS_NOISE=has_noise,
            HALF_NOISE=has_noise and noise.element_size() == 2,
            RAGGED=ragged,
            IDX_BITS=idx_bits,
            BLOCK=block,
            num_warps=num_warps,
        )
