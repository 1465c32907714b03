"""Triton kernels for gather_patches: copy kept patches straight out of the image, and scatter them back; and the
patch geometry the loss kernels share.

Images are seen as [N, C, T, H, W] (T = 1 and a tubelet of 1 for 2-D images). A patch row holds its P = C * PT *
PS * PS values in ``patchify`` order e = s * C + c (s = (t, row, col) inside the patch, c = channel). A program
takes a tile [ROWS, BLOCK_P]: ROWS kept patches, one chunk of BLOCK_P values of each, in that order. The output
rows (the gradient rows backward) are then contiguous vectors; each image value is read (written backward) at its
own place, from one offset table for the program plus each row's patch base. The ROWS patch indices are loaded
together, so a program has ROWS * BLOCK_P values in flight behind a single index load.

In the image a patch is C * PT * PS runs of PS neighbouring pixels, one channel each, while patchify order
interleaves the channels: read value by value, one warp instruction touches a few bytes of each of some twenty
runs. With ``TRANSPOSE`` (C > 1 and pixels contiguous in the image, Triton >= 3.4 for ``tl.gather``) a program reads
whole patches in the image's own order, a tile [ROWS, BLOCK_C, BLOCK_S] of 16-byte vectors along each run, and
moves it into patchify order through shared memory (``to_patch_order``; ``to_image_order`` backward).
"""

from __future__ import annotations

import re
from typing import Optional

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
def image_order_offsets(s_c, s_t, s_h, s_w, C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets from the patch base [BLOCK_C, BLOCK_S] of value (c, s) in the image's order, and where they lie
    inside the patch."""
    c = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    off = c[:, None] * s_c + pixel_offsets(s, s_t, s_h, s_w, PS)[None, :]
    return off, (c < C)[:, None] & (s < PT * PS * PS)[None, :]


def _triton_version() -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


# tl.gather came with Triton 3.3, but 3.3 lowers a 1-D gather with warp shuffles over the whole tile (16384 a thread
# at ViT-B: minutes of ptxas and a slow kernel) and fails to compile one whose index is longer than its source (the
# backward at C 3, PS 6); from 3.4 on it goes through shared memory. Triton 3.0 resolves every attribute a kernel's
# helpers name (taken branch or not) when it hashes them, so below 3.4 the helpers are stand-ins that the TRANSPOSE
# branch never reaches.
HAS_TL_GATHER = hasattr(tl, "gather") and _triton_version() >= (3, 4)

if HAS_TL_GATHER:

    @triton.jit
    def to_patch_order(x, C: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
        """[ROWS, BLOCK_C, BLOCK_S] patches in the image's order (channel, pixel) -> [ROWS, BLOCK_P] in patchify
        order e = s * C + c; positions past C * S hold the value (0, 0). One gather over the whole tile: its axis
        spans every warp, so it goes through shared memory, not warp shuffles (a [ROWS, ...] gather along its last
        axis became 1024 shuffles a thread)."""
        e = tl.arange(0, BLOCK_P)
        within = tl.where(e < C * S, (e % C) * BLOCK_S + e // C, 0)
        idx = tl.arange(0, ROWS)[:, None] * (BLOCK_C * BLOCK_S) + within[None, :]
        flat = tl.reshape(x, [ROWS * BLOCK_C * BLOCK_S])
        return tl.reshape(tl.gather(flat, tl.reshape(idx, [ROWS * BLOCK_P]), 0), [ROWS, BLOCK_P])

    @triton.jit
    def to_image_order(y, C: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
        """The inverse of :func:`to_patch_order`: [ROWS, BLOCK_P] in patchify order -> [ROWS, BLOCK_C, BLOCK_S] in
        the image's order (positions outside the patch hold the value e = 0)."""
        c = tl.arange(0, BLOCK_C)
        s = tl.arange(0, BLOCK_S)
        within = tl.where((c < C)[:, None] & (s < S)[None, :], s[None, :] * C + c[:, None], 0)
        idx = tl.arange(0, ROWS)[:, None, None] * BLOCK_P + within[None, :, :]
        flat = tl.reshape(y, [ROWS * BLOCK_P])
        return tl.reshape(tl.gather(flat, tl.reshape(idx, [ROWS * BLOCK_C * BLOCK_S]), 0),
                          [ROWS, BLOCK_C, BLOCK_S])

else:

    @triton.jit
    def to_patch_order(x, C: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
        tl.static_assert(False, "to_patch_order needs tl.gather as Triton >= 3.4 compiles it")
        return x

    @triton.jit
    def to_image_order(y, C: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
        tl.static_assert(False, "to_image_order needs tl.gather as Triton >= 3.4 compiles it")
        return y


@triton.jit
def _rows(pid, ids_ptr, total_rows, K, GH, GW, s_n, s_t, s_h, s_w, img_ptr, PT: tl.constexpr, PS: tl.constexpr,
          ROWS: tl.constexpr):
    """Row numbers (int64), their mask and their patch base pointers for the ROWS rows starting at pid * ROWS."""
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rows_ok = rows < total_rows
    l = tl.load(ids_ptr + rows, mask=rows_ok, other=0).to(tl.int32)
    return rows, rows_ok, patch_base(img_ptr, rows // K, l, GH, GW, s_n, s_t, s_h, s_w, PT, PS)


@triton.jit
def _tile(pid, ids_ptr, total_rows, K, GH, GW, s_n, s_c, s_t, s_h, s_w, img_ptr,
          C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr):
    """Image pointers, row offsets (int64) and mask of one [ROWS, BLOCK_P] tile."""
    P: tl.constexpr = C * PT * PS * PS
    CHUNKS: tl.constexpr = (P + BLOCK_P - 1) // BLOCK_P
    # the chunks of one set of rows are neighbouring programs: they run together and share the image's sectors
    e = (pid % CHUNKS) * BLOCK_P + tl.arange(0, BLOCK_P)
    rows, rows_ok, base = _rows(pid // CHUNKS, ids_ptr, total_rows, K, GH, GW, s_n, s_t, s_h, s_w, img_ptr, PT, PS,
                                ROWS)
    img = base[:, None] + patch_offsets(e, s_c, s_t, s_h, s_w, C, PS)[None, :]
    row_off = rows[:, None] * P + e[None, :]
    return img, row_off, rows_ok[:, None] & (e < P)[None, :]


@triton.jit
def _whole_tile(pid, ids_ptr, total_rows, K, GH, GW, s_n, s_c, s_t, s_h, s_w, img_ptr,
                C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """The TRANSPOSE tile, ROWS whole patches: image pointers [ROWS, BLOCK_C, BLOCK_S] and their mask, row
    offsets [ROWS, BLOCK_P] and theirs."""
    P: tl.constexpr = C * PT * PS * PS
    rows, rows_ok, base = _rows(pid, ids_ptr, total_rows, K, GH, GW, s_n, s_t, s_h, s_w, img_ptr, PT, PS, ROWS)
    off, inside = image_order_offsets(s_c, s_t, s_h, s_w, C, PT, PS, BLOCK_C, BLOCK_S)
    e = tl.arange(0, BLOCK_P)
    return (base[:, None, None] + off[None, :, :], rows_ok[:, None, None] & inside[None, :, :],
            rows[:, None] * P + e[None, :], rows_ok[:, None] & (e < P)[None, :])


@triton.jit
def gather_patches_fwd_kernel(
    x_ptr,  # [N, C, T, H, W] images, any strides
    ids_ptr,  # [N * K] int64 kept patch indices, contiguous
    out_ptr,  # [N * K, P] kept patches, contiguous, any float dtype
    total_rows, K, GH, GW,  # N * K, kept patches per sample, patch grid height and width
    s_n, s_c, s_t, s_h, s_w,  # image strides (elements)
    C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
    TRANSPOSE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    if TRANSPOSE:
        img, img_ok, row_off, ok = _whole_tile(tl.program_id(0), ids_ptr, total_rows, K, GH, GW, s_n, s_c, s_t, s_h,
                                               s_w, x_ptr, C, PT, PS, BLOCK_P, ROWS, BLOCK_C, BLOCK_S)
        x = to_patch_order(tl.load(img, mask=img_ok), C, PT * PS * PS, ROWS, BLOCK_C, BLOCK_S, BLOCK_P)
    else:
        img, row_off, ok = _tile(tl.program_id(0), ids_ptr, total_rows, K, GH, GW, s_n, s_c, s_t, s_h, s_w, x_ptr,
                                 C, PT, PS, BLOCK_P, ROWS)
        x = tl.load(img, mask=ok)
    tl.store(out_ptr + row_off, x.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def gather_patches_bwd_kernel(
    g_ptr,  # [N * K, P] gradient of the kept patches, contiguous
    ids_ptr,  # [N * K] int64 kept patch indices, contiguous
    gx_ptr,  # [N, C, T, H, W] image gradient, zero-filled before the launch
    total_rows, K, GH, GW,
    s_n, s_c, s_t, s_h, s_w,  # strides of gx (elements)
    C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
    TRANSPOSE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    if TRANSPOSE:
        img, img_ok, row_off, ok = _whole_tile(tl.program_id(0), ids_ptr, total_rows, K, GH, GW, s_n, s_c, s_t, s_h,
                                               s_w, gx_ptr, C, PT, PS, BLOCK_P, ROWS, BLOCK_C, BLOCK_S)
        g = to_image_order(tl.load(g_ptr + row_off, mask=ok), C, PT * PS * PS, ROWS, BLOCK_C, BLOCK_S, BLOCK_P)
        tl.store(img, g.to(gx_ptr.dtype.element_ty), mask=img_ok)
    else:
        img, row_off, ok = _tile(tl.program_id(0), ids_ptr, total_rows, K, GH, GW, s_n, s_c, s_t, s_h, s_w, gx_ptr,
                                 C, PT, PS, BLOCK_P, ROWS)
        tl.store(img, tl.load(g_ptr + row_off, mask=ok).to(gx_ptr.dtype.element_ty), mask=ok)


# a program's tile: up to GATHER_TILE values (ROWS rows of one BLOCK_P chunk), GATHER_WARPS warps. Not yet timed
# on a GPU (benchmarks/gpu_session.sh's sweep:gather); 4096 values at 4 warps are the loss kernel's tile, whose
# image reads are this kernel's.
GATHER_TILE = 4096
GATHER_WARPS = 4
# whole patches read in the image's order and transposed through shared memory (the module docstring). Static
# count on sm_90 (Triton 3.6, bf16 ViT-B tile of 4 patches): 3 16-byte global loads a thread instead of 32 2-byte
# ones, plus 4 16-byte shared stores and 32 2-byte shared loads; 32 registers. Not yet timed on a GPU
# (sweep:gather times both).
TRANSPOSE = True


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


def tile_config(C: int, S: int, total_rows: int, pixels_contiguous: bool) -> tuple[int, dict[str, int]]:
    """(programs, launch constants) for ``total_rows`` rows of P = C * S values (S pixels of C channels each) of an
    image whose neighbouring pixels are neighbours in memory or not (``pixels_contiguous``)."""
    P = C * S
    block_c, block_s = next_pow2(C), next_pow2(S)
    transpose = transposes(C, S, pixels_contiguous)
    block_p = next_pow2(P) if transpose else chunk_size(P)
    width = block_c * block_s if transpose else block_p
    rows = max(1, min(GATHER_TILE // width, next_pow2(total_rows)))
    rows = 1 << (rows.bit_length() - 1)
    programs = cdiv(total_rows, rows) * cdiv(P, block_p)
    return programs, {"BLOCK_P": block_p, "ROWS": rows, "TRANSPOSE": transpose, "BLOCK_C": block_c,
                      "BLOCK_S": block_s, "num_warps": max(1, min(GATHER_WARPS, rows * width // 256))}


def transposes(C: int, S: int, pixels_contiguous: bool, setting: Optional[bool] = None,
               tile: Optional[int] = None) -> bool:
    """Whether whole patches of C channels of S pixels are read in the image's order and transposed in registers:
    the ``setting`` (this module's TRANSPOSE by default), Triton's ``tl.gather``, more than one channel (with one,
    patchify order is the image's), pixels that are neighbours in memory (a channels-last image is close to patchify
    order already) and a padded patch of at most ``tile`` values (GATHER_TILE by default)."""
    setting = TRANSPOSE if setting is None else setting
    tile = max(GATHER_TILE, 128) if tile is None else tile
    return setting and HAS_TL_GATHER and C > 1 and pixels_contiguous and next_pow2(C) * next_pow2(S) <= tile
