"""Triton kernels for embed_visible: a GEMM whose A rows are kept patches gathered from the image.

out[m, :] = A[m, :] @ W^T + bias + pos[ids_keep[m] + POS_OFF] for the M = N*K kept patches, where W is the conv
weight viewed [D, P]. The reduction runs over P in the conv weight's own order (channel, t, row, col): then the
weight needs no permuted copy and each A row is read as runs of ``p`` neighbouring pixels. The order of a dot
product's terms does not change its value, so this is the (t, row, col, channel) patch embedding of the contract.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mimfast.kernels.gather_patches import pixel_offsets
from mimfast.kernels.sizes import next_pow2


@triton.jit
def _patch_base(m, m_ok, ids_ptr, K, GH, GW, s_n, s_t, s_h, s_w, PT: tl.constexpr, PS: tl.constexpr):
    """Image offset of the first pixel of each kept patch m, and its patch index."""
    idx = tl.load(ids_ptr + m, mask=m_ok, other=0)  # int64, so the offsets are int64
    n = (m // K).to(tl.int64)
    gt = idx // (GH * GW)
    gh = (idx // GW) % GH
    gw = idx % GW
    return n * s_n + gt * PT * s_t + gh * PS * s_h + gw * PS * s_w, idx


@triton.jit
def _pixel_offsets(q, s_c, s_t, s_h, s_w, PT: tl.constexpr, PS: tl.constexpr):
    """Offset inside a patch of reduction index q in the conv weight order (channel, t, row, col)."""
    return (q // (PT * PS * PS)) * s_c + pixel_offsets(q % (PT * PS * PS), s_t, s_h, s_w, PS)


@triton.jit
def embed_visible_fwd_kernel(
    x_ptr,  # [N, C, T, H, W] images, any strides
    ids_ptr,  # [N * K] int64 kept patch indices
    w_ptr,  # [D, P] conv weight, contiguous, P in (channel, t, row, col) order
    b_ptr,  # [D] bias in any float dtype (unused unless HAS_BIAS)
    pos_ptr,  # [POS_OFF + L, D] position embedding, contiguous (unused unless HAS_POS)
    out_ptr,  # [N * K, D] embeddings, contiguous
    M, K, D, GH, GW, POS_OFF,
    s_n, s_c, s_t, s_h, s_w,
    C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    P: tl.constexpr = C * PT * PS * PS
    # D blocks vary fastest, so the programs sharing one set of A rows run together and hit them in L2
    d_blocks = tl.cdiv(D, BLOCK_D)
    d = (tl.program_id(0) % d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (tl.program_id(0) // d_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    d_ok = d < D
    m_ok = m < M
    base, idx = _patch_base(m, m_ok, ids_ptr, K, GH, GW, s_n, s_t, s_h, s_w, PT, PS)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        q = p0 + tl.arange(0, BLOCK_P)
        q_ok = q < P
        a = tl.load(x_ptr + base[:, None] + _pixel_offsets(q, s_c, s_t, s_h, s_w, PT, PS)[None, :],
                    mask=m_ok[:, None] & q_ok[None, :], other=0.0)
        w = tl.load(w_ptr + d[None, :] * P + q[:, None], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        # rounded to the weight dtype first: what autocast's cast of a conv's bias does
        acc += tl.load(b_ptr + d, mask=d_ok, other=0.0).to(w_ptr.dtype.element_ty).to(tl.float32)[None, :]
    ok = m_ok[:, None] & d_ok[None, :]
    if HAS_POS:
        acc += tl.load(pos_ptr + (idx + POS_OFF)[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64)[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def embed_visible_bwd_weight_kernel(
    x_ptr,  # [N, C, T, H, W] images, any strides
    ids_ptr,  # [N * K] int64 kept patch indices
    g_ptr,  # [N * K, D] output gradient, contiguous
    part_ptr,  # [S, D * P + D] fp32 partial gradients per chunk of rows: weight [D, P], then bias [D]
    M, K, D, GH, GW, M_PER,  # M_PER rows per chunk, a multiple of BLOCK_M
    s_n, s_c, s_t, s_h, s_w,
    C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    P: tl.constexpr = C * PT * PS * PS
    chunk = tl.program_id(2)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    q = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    d_ok = d < D
    q_ok = q < P
    q_off = _pixel_offsets(q, s_c, s_t, s_h, s_w, PT, PS)
    acc = tl.zeros([BLOCK_D, BLOCK_P], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    m_end = tl.minimum(chunk * M_PER + M_PER, M)
    # rows in a fixed order inside a chunk, chunks summed in a fixed order afterwards: deterministic
    for m0 in range(chunk * M_PER, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < m_end
        base, _ = _patch_base(m, m_ok, ids_ptr, K, GH, GW, s_n, s_t, s_h, s_w, PT, PS)
        a = tl.load(x_ptr + base[:, None] + q_off[None, :], mask=m_ok[:, None] & q_ok[None, :], other=0.0)
        g = tl.load(g_ptr + m.to(tl.int64)[:, None] * D + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(g.to(DOT_DTYPE)), a.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        acc_b += tl.sum(g.to(tl.float32), axis=0)
    slab = part_ptr + chunk.to(tl.int64) * (D * P + D)
    tl.store(slab + d[:, None].to(tl.int64) * P + q[None, :], acc, mask=d_ok[:, None] & q_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(slab + D * P + d, acc_b, mask=d_ok)


@triton.jit
def embed_visible_bwd_pos_kernel(
    g_ptr,  # [N * K, D] output gradient, contiguous
    inv_ptr,  # [N, L] int64: k with ids_keep[n, k] = l, or -1 where patch l is not kept
    gpos_ptr,  # [POS_OFF + L, D] fp32 position-embedding gradient, rows before POS_OFF left as they are
    N, L, K, D, POS_OFF,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    l_ok = l < L
    d_ok = d < D
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    # a patch is kept at most once per sample, so its gradient is a sum over the batch, taken in sample order
    for n in range(0, N):
        k = tl.load(inv_ptr + tl.cast(n, tl.int64) * L + l, mask=l_ok, other=-1)
        row = tl.cast(n, tl.int64) * K + k
        hit = (k >= 0)[:, None] & d_ok[None, :]
        acc += tl.load(g_ptr + row[:, None] * D + d[None, :], mask=hit, other=0.0).to(tl.float32)
    tl.store(gpos_ptr + (l + POS_OFF)[:, None] * D + d[None, :], acc, mask=l_ok[:, None] & d_ok[None, :])


def gemm_config(D: int, P: int) -> dict[str, int]:
    """Forward tiles: 128 kept patches x 128 embedding columns, 64 pixels per step (tl.dot needs every block
    dimension >= 16). Each A row (gathered fp32 pixels) is read once per 128 columns and each weight tile once per
    128 patches: half the L2 traffic of 64 x 128 tiles, with three pipeline stages in 144 KB of shared memory."""
    return {"BLOCK_M": 128, "BLOCK_D": max(16, min(128, next_pow2(D))),
            "BLOCK_P": max(16, min(64, next_pow2(P))), "num_warps": 8}


def wgrad_config(D: int, P: int) -> dict[str, int]:
    """Weight-gradient tiles: 128 x 128 of [D, P] per program, reducing over 32 kept patches per step (fp32 A and
    grad tiles, 32 KB a stage: two programs fit an SM). The rows are split in chunks to fill the SMs."""
    return {"BLOCK_M": 32, "BLOCK_D": max(16, min(128, next_pow2(D))),
            "BLOCK_P": max(16, min(128, next_pow2(P))), "num_warps": 8}


def pos_config(L: int, D: int) -> dict[str, int]:
    return {"BLOCK_L": min(8, next_pow2(L)), "BLOCK_D": min(64, next_pow2(D)),
            "num_warps": 4}
