"""Triton kernels for gather_patches: copy kept patches straight out of the image, and scatter them back; and the
patch geometry the loss kernels share.

Images are seen as [N, C, T, H, W] (T = 1 and a tubelet of 1 for 2-D images). A patch row holds its P = C * PT *
PS * PS values in ``patchify`` order e = s * C + c (s = (t, row, col) inside the patch, c = channel). A program
takes a tile [ROWS, BLOCK_P]: ROWS kept patches, one chunk of BLOCK_P values of each, in that order. The output
rows (the gradient rows backward) are then contiguous vectors; each image value is read (written backward) at its
own place, from one offset table for the program plus each row's patch base. The ROWS patch indices are loaded
together, so a program has ROWS * BLOCK_P values in flight behind a single index load.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mimfast.kernels.sizes import cdiv, next_pow2


@triton.jit
def patch_base(img_ptr, n, l, GH, GW, s_n, s_t, s_h, s_w, PT: tl.constexpr, PS: tl.constexpr):
    """Pointer to the first value (channel 0) of patch ``l`` of image ``n`` (int64): the patch coordinates in 32 bits
    (64-bit division costs many instructions and registers), their products with the strides in 64 bits, once per
    patch."""
    gt = l // (GH * GW)
    gh = (l // GW) % GH
    gw = l % GW
    # left to right: each coordinate is int64 before it meets a stride (PT * s_t alone would be an int32 product)
    return (img_ptr + n * s_n + gt.to(tl.int64) * PT * s_t + gh.to(tl.int64) * PS * s_h
            + gw.to(tl.int64) * PS * s_w)


@triton.jit
def pixel_offsets(s, s_t, s_h, s_w, PS: tl.constexpr):
    """Offset from its patch base of pixel s = (t * PS + row) * PS + col of channel 0. Offsets inside a patch fit in
    int32 (the ops' backend reasons check): 32-bit per-value arithmetic."""
    return (s // (PS * PS)) * s_t + ((s // PS) % PS) * s_h + (s % PS) * s_w


@triton.jit
def patch_offsets(e, s_c, s_t, s_h, s_w, C: tl.constexpr, PS: tl.constexpr):
    """Offset from its patch base of the value at ``patchify`` position e = ((t * PS + row) * PS + col) * C + c."""
    return (e % C) * s_c + pixel_offsets(e // C, s_t, s_h, s_w, PS)


@triton.jit
def _tile(pid, ids_ptr, total_rows, K, GH, GW, s_n, s_c, s_t, s_h, s_w, img_ptr,
          C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr):
    """Image pointers, row offsets (int64) and mask of one [ROWS, BLOCK_P] tile."""
    P: tl.constexpr = C * PT * PS * PS
    CHUNKS: tl.constexpr = (P + BLOCK_P - 1) // BLOCK_P
    # the chunks of one set of rows are neighbouring programs: they run together and share the image's sectors
    e = (pid % CHUNKS) * BLOCK_P + tl.arange(0, BLOCK_P)
    rows = (pid // CHUNKS) * ROWS + tl.arange(0, ROWS)
    rows_ok = rows < total_rows
    l = tl.load(ids_ptr + rows, mask=rows_ok, other=0).to(tl.int32)
    base = patch_base(img_ptr, (rows // K).to(tl.int64), l, GH, GW, s_n, s_t, s_h, s_w, PT, PS)
    img = base[:, None] + patch_offsets(e, s_c, s_t, s_h, s_w, C, PS)[None, :]
    row_off = rows.to(tl.int64)[:, None] * P + e[None, :]
    return img, row_off, rows_ok[:, None] & (e < P)[None, :]


@triton.jit
def gather_patches_fwd_kernel(
    x_ptr,  # [N, C, T, H, W] images, any strides
    ids_ptr,  # [N * K] int64 kept patch indices, contiguous
    out_ptr,  # [N * K, P] kept patches, contiguous, any float dtype
    total_rows, K, GH, GW,  # N * K, kept patches per sample, patch grid height and width
    s_n, s_c, s_t, s_h, s_w,  # image strides (elements)
    C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
):
    img, row_off, ok = _tile(tl.program_id(0), ids_ptr, total_rows, K, GH, GW, s_n, s_c, s_t, s_h, s_w, x_ptr,
                             C, PT, PS, BLOCK_P, ROWS)
    tl.store(out_ptr + row_off, tl.load(img, mask=ok).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def gather_patches_bwd_kernel(
    g_ptr,  # [N * K, P] gradient of the kept patches, contiguous
    ids_ptr,  # [N * K] int64 kept patch indices, contiguous
    gx_ptr,  # [N, C, T, H, W] image gradient, zero-filled before the launch
    total_rows, K, GH, GW,
    s_n, s_c, s_t, s_h, s_w,  # strides of gx (elements)
    C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
):
    img, row_off, ok = _tile(tl.program_id(0), ids_ptr, total_rows, K, GH, GW, s_n, s_c, s_t, s_h, s_w, gx_ptr,
                             C, PT, PS, BLOCK_P, ROWS)
    tl.store(img, tl.load(g_ptr + row_off, mask=ok).to(gx_ptr.dtype.element_ty), mask=ok)


# a program's tile: up to GATHER_TILE values (ROWS rows of one BLOCK_P chunk), GATHER_WARPS warps. Not yet timed
# on a GPU (benchmarks/gpu_session.sh's sweep:gather); 4096 values at 4 warps are the loss kernel's tile, whose
# image reads are this kernel's.
GATHER_TILE = 4096
GATHER_WARPS = 4


def chunk_size(P: int) -> int:
    """BLOCK_P for rows of P values: the power of 2 from 128 to next_pow2(P) (at most GATHER_TILE) that pads P the
    least (the larger at a tie), so few lanes idle: 256 for P 768 (3 chunks, none padded), 128 for P 588 (5
    chunks, 8% padding), GATHER_TILE for a big power of 2."""
    top = min(next_pow2(P), max(128, GATHER_TILE))
    best = top
    b = top
    while b >= 128:
        if cdiv(P, b) * b < cdiv(P, best) * best:
            best = b
        b //= 2
    return best


def tile_config(P: int, total_rows: int) -> tuple[int, dict[str, int]]:
    """(programs, launch constants) for ``total_rows`` rows of P values."""
    block_p = chunk_size(P)
    rows = max(1, min(GATHER_TILE // block_p, next_pow2(total_rows)))
    rows = 1 << (rows.bit_length() - 1)
    programs = cdiv(total_rows, rows) * cdiv(P, block_p)
    return programs, {"BLOCK_P": block_p, "ROWS": rows,
                      "num_warps": max(1, min(GATHER_WARPS, rows * block_p // 256))}
