"""Triton kernels for restore_tokens: build the decoder input in one pass, and its backward in one pass.

Output rows are j = OFF + l (OFF = 1 when a cls row leads, l the patch position); row l takes visible row
ids_restore[n, l] of x_vis when that is < K, else the mask token, plus pos_embed row j.

The forward and the common backward (no pos_embed gradient: MAE's decoder_pos_embed is a frozen table) see the
output as one flat list of N * (OFF + L) rows cut into tiles of BLOCK_R rows. In the forward every tile is one
program with no loop, so thousands of programs keep the memory system busy whatever the batch size; the backward's
programs each walk a strided set of tiles, so its mask-token gradient leaves a few partials per SM to add up. The
backward with a pos_embed gradient sums over the batch per position instead, so its programs own positions and
loop over a batch chunk.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mimfast.kernels.sizes import next_pow2


@triton.jit
def _flat_rows(tile, ids_ptr, s_idn, NR, R, L, K, HAS_CLS: tl.constexpr, BLOCK_R: tl.constexpr):
    """The flat output rows r = n * R + j of row tile ``tile``: the int64 row, whether it exists, which x_vis row
    feeds it (n * (OFF + K) + source row), whether it is visible (or the cls row), and whether it takes the mask
    token."""
    OFF: tl.constexpr = 1 if HAS_CLS else 0
    r = tl.cast(tile, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < NR
    n = r // R
    tok = r % R - OFF
    is_tok = row_ok & (tok >= 0)
    src = tl.load(ids_ptr + n * s_idn + tok, mask=is_tok, other=0)
    visible = is_tok & (src < K)
    if HAS_CLS:
        visible = visible | (row_ok & (tok < 0))
    xrow = tl.where(visible & (tok >= 0), src + OFF, 0)
    return r, row_ok, n, xrow, visible, is_tok & (src >= K)


@triton.jit
def restore_tokens_fwd_kernel(
    x_ptr,  # [N, OFF + K, D] visible tokens (cls row first when HAS_CLS), any strides
    ids_ptr,  # [N, L] int64 ids_restore
    mt_ptr,  # [D] mask token
    pos_ptr,  # [OFF + L, D] position embedding, contiguous (unused unless HAS_POS)
    out_ptr,  # [N * (OFF + L), D] decoder input, contiguous
    NR, L, K, D,  # NR = N * (OFF + L) output rows
    s_xn, s_xr, s_xd, s_idn,
    HAS_CLS: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    R = L + (1 if HAS_CLS else 0)
    r, row_ok, n, xrow, visible, _ = _flat_rows(tl.program_id(0), ids_ptr, s_idn, NR, R, L, K, HAS_CLS, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    v = tl.load(x_ptr + n[:, None] * s_xn + xrow[:, None] * s_xr + d[None, :] * s_xd,
                mask=visible[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    mt = tl.load(mt_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    v = tl.where(visible[:, None], v, mt[None, :])
    ok = row_ok[:, None] & d_ok[None, :]
    if HAS_POS:
        v += tl.load(pos_ptr + (r % R)[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + r[:, None] * D + d[None, :], v.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_tile(g_ptr, r, row_ok, d, d_ok, D):
    """Rows r of the decoder-input gradient [NR, D], columns d."""
    return tl.load(g_ptr + r[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _scatter_tile(g, gx_ptr, n, xrow, visible, masked, d, d_ok, R, L, K, D, mt):
    """Write the visible rows of gradient tile g to their x_vis rows; return mt plus the masked rows' column sums."""
    # ids_restore is a permutation, so each x_vis row is written by exactly one output row
    tl.store(gx_ptr + (n * (K + R - L) + xrow)[:, None] * D + d[None, :], g.to(gx_ptr.dtype.element_ty),
             mask=visible[:, None] & d_ok[None, :])
    return mt + tl.sum(tl.where(masked[:, None], g.to(tl.float32), 0.0), axis=0)


@triton.jit
def restore_tokens_bwd_kernel(
    g_ptr,  # [N * (OFF + L), D] gradient of the decoder input, contiguous
    ids_ptr,  # [N, L] int64 ids_restore
    gx_ptr,  # [N * (OFF + K), D] gradient of x_vis, contiguous
    part_mt_ptr,  # [num_programs(0), D] fp32 mask-token gradient of each program's row tiles
    NR, L, K, D,
    s_idn,
    HAS_CLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PREFETCH: tl.constexpr,
):
    # each program walks the row tiles pid, pid + num_programs, ... in order: a few programs per SM, and one
    # mask-token partial per program (a short second pass) instead of one per tile
    R = L + (1 if HAS_CLS else 0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    mt = tl.zeros([BLOCK_D], tl.float32)
    step = tl.num_programs(0)
    if PREFETCH:
        # the next tile's indices and gradient are loaded before this tile is written: two tiles in flight
        r, row_ok, n, xrow, visible, masked = _flat_rows(tl.program_id(0), ids_ptr, s_idn, NR, R, L, K, HAS_CLS,
                                                         BLOCK_R)
        g = _grad_tile(g_ptr, r, row_ok, d, d_ok, D)
        for tile in range(tl.program_id(0), tl.cdiv(NR, BLOCK_R), step):
            r2, row_ok2, n2, xrow2, visible2, masked2 = _flat_rows(tile + step, ids_ptr, s_idn, NR, R, L, K,
                                                                   HAS_CLS, BLOCK_R)
            g2 = _grad_tile(g_ptr, r2, row_ok2, d, d_ok, D)
            mt = _scatter_tile(g, gx_ptr, n, xrow, visible, masked, d, d_ok, R, L, K, D, mt)
            n, xrow, visible, masked, g = n2, xrow2, visible2, masked2, g2
    else:
        for tile in range(tl.program_id(0), tl.cdiv(NR, BLOCK_R), step):
            r, row_ok, n, xrow, visible, masked = _flat_rows(tile, ids_ptr, s_idn, NR, R, L, K, HAS_CLS, BLOCK_R)
            g = _grad_tile(g_ptr, r, row_ok, d, d_ok, D)
            mt = _scatter_tile(g, gx_ptr, n, xrow, visible, masked, d, d_ok, R, L, K, D, mt)
    tl.store(part_mt_ptr + tl.program_id(0).to(tl.int64) * D + d, mt, mask=d_ok)


@triton.jit
def _rows(n, ids_ptr, s_idn, L, K, HAS_CLS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows of sample n owned by this program, whether each exists, its x_vis row, visible, masked."""
    OFF: tl.constexpr = 1 if HAS_CLS else 0
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tok = rows - OFF
    is_tok = (tok >= 0) & (tok < L)
    src = tl.load(ids_ptr + n * s_idn + tok, mask=is_tok, other=0)
    visible = is_tok & (src < K)
    if HAS_CLS:
        visible = visible | (rows == 0)
    return rows, rows < L + OFF, tl.where(is_tok & visible, src + OFF, 0), visible, is_tok & (src >= K)


@triton.jit
def restore_tokens_bwd_pos_kernel(
    g_ptr,  # [N, OFF + L, D] gradient of the decoder input, contiguous
    ids_ptr,  # [N, L] int64 ids_restore
    gx_ptr,  # [N, OFF + K, D] gradient of x_vis, contiguous
    part_mt_ptr,  # [S, n_row_blocks, D] fp32 partial sums of the mask-token gradient
    part_pos_ptr,  # [S, OFF + L, D] fp32 partial sums over the batch
    N, L, K, D, N_PER,  # N_PER samples per batch chunk
    s_idn,
    HAS_CLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(2)
    R = L + (1 if HAS_CLS else 0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    mt_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    pos_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n0 = chunk * N_PER
    # samples in a fixed order inside each chunk: the partial sums, and so the gradients, are deterministic
    for i in range(n0, tl.minimum(n0 + N_PER, N)):
        n = tl.cast(i, tl.int64)
        _, row_ok, xrow, visible, masked = _rows(n, ids_ptr, s_idn, L, K, HAS_CLS, BLOCK_R)
        ok = row_ok[:, None] & d_ok[None, :]
        g = tl.load(g_ptr + (n * R + rows[:, None]) * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(gx_ptr + (n * (K + R - L) + xrow[:, None]) * D + d[None, :], g.to(gx_ptr.dtype.element_ty),
                 mask=ok & visible[:, None])
        mt_acc += tl.sum(tl.where(masked[:, None], g, 0.0), axis=0)
        pos_acc += g
    tl.store(part_mt_ptr + (chunk * tl.num_programs(0) + tl.program_id(0)) * D + d, mt_acc, mask=d_ok)
    tl.store(part_pos_ptr + (chunk * R + rows[:, None]) * D + d[None, :], pos_acc,
             mask=(rows < R)[:, None] & d_ok[None, :])


# rows of a flat-row tile
FLAT_BLOCK_R = 64
# the common backward loads a tile ahead (on the H100 it read the gradient at 60% of the copy bandwidth, the forward
# wrote at 74%); not yet timed on a GPU, so off
BWD_PREFETCH = False


def flat_config(D: int) -> dict[str, int]:
    """Tile of the flat-row kernels: FLAT_BLOCK_R rows by up to 128 columns; 8 warps from 4096 values on (at 64
    rows, 32 values a thread, eight 16-byte accesses), 4 below."""
    block_d = min(128, next_pow2(max(D, 1)))
    block_r = FLAT_BLOCK_R
    return {"BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": 8 if block_r * block_d >= 4096 else 4}


def pos_config(R: int, D: int) -> dict[str, int]:
    return {"BLOCK_R": min(16, next_pow2(max(R, 1))),
            "BLOCK_D": min(128, next_pow2(max(D, 1))), "num_warps": 4}
