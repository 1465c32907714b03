"""Triton kernels for gather_patches: copy kept patches straight out of the image, and scatter them back.

Images are seen as [N, C, T, H, W] (T = 1 and a tubelet of 1 for 2-D images). One program moves one kept patch
(or one slice of it): the tile is loaded in the image's own order [channel, (t, row), col], so each load is a run
of ``p`` neighbouring pixels, and permuted in registers to the patch order (t, row, col, channel) before the store,
which then writes one contiguous stretch of the output row.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mimfast.kernels.sizes import next_pow2


@triton.jit
def _patch_tile(pid, ids_ptr, K, GH, GW, s_n, s_c, s_t, s_h, s_w,
                C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """Image offsets [BLOCK_C, BLOCK_R, BLOCK_W] and patch-row offsets [BLOCK_R, BLOCK_W, BLOCK_C] of one tile."""
    n = pid // K
    idx = tl.load(ids_ptr + pid)  # int64, so every offset below is int64
    gt = idx // (GH * GW)
    gh = (idx // GW) % GH
    gw = idx % GW
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # r = t * PS + row inside the cube
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col = tl.arange(0, BLOCK_W)
    base = n.to(tl.int64) * s_n + gt * PT * s_t + gh * PS * s_h + gw * PS * s_w
    line = (r // PS) * s_t + (r % PS) * s_h
    img_off = base + c[:, None, None] * s_c + line[None, :, None] + col[None, None, :] * s_w
    img_mask = (c < C)[:, None, None] & (r < PT * PS)[None, :, None] & (col < PS)[None, None, :]
    in_patch = (r[:, None, None] * PS + col[None, :, None]) * C + c[None, None, :]
    row_off = pid.to(tl.int64) * (PT * PS * PS * C) + in_patch
    row_mask = (r < PT * PS)[:, None, None] & (col < PS)[None, :, None] & (c < C)[None, None, :]
    return img_off, img_mask, row_off, row_mask


@triton.jit
def gather_patches_fwd_kernel(
    x_ptr,  # [N, C, T, H, W] images, any strides
    ids_ptr,  # [N, K] int64 kept patch indices, contiguous
    out_ptr,  # [N, K, P] kept patches, contiguous
    K, GH, GW,  # kept patches per sample, patch grid height and width
    s_n, s_c, s_t, s_h, s_w,  # image strides (elements)
    C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    img_off, img_mask, row_off, row_mask = _patch_tile(
        tl.program_id(0), ids_ptr, K, GH, GW, s_n, s_c, s_t, s_h, s_w, C, PT, PS, BLOCK_C, BLOCK_R, BLOCK_W)
    v = tl.load(x_ptr + img_off, mask=img_mask)
    tl.store(out_ptr + row_off, tl.permute(v, (1, 2, 0)), mask=row_mask)


@triton.jit
def gather_patches_bwd_kernel(
    g_ptr,  # [N, K, P] gradient of the kept patches, contiguous
    ids_ptr,  # [N, K] int64 kept patch indices, contiguous
    gx_ptr,  # [N, C, T, H, W] image gradient, zero-filled before the launch
    K, GH, GW,
    s_n, s_c, s_t, s_h, s_w,  # strides of gx (elements)
    C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    img_off, img_mask, row_off, row_mask = _patch_tile(
        tl.program_id(0), ids_ptr, K, GH, GW, s_n, s_c, s_t, s_h, s_w, C, PT, PS, BLOCK_C, BLOCK_R, BLOCK_W)
    g = tl.load(g_ptr + row_off, mask=row_mask)
    tl.store(gx_ptr + img_off, tl.permute(g, (2, 0, 1)), mask=img_mask)


def tile_config(C: int, PT: int, PS: int) -> dict[str, int]:
    """Tile of at most 4096 values: all of a small patch, a slice of (t, row) lines of a big one."""
    block_w = next_pow2(PS)
    block_c = min(next_pow2(C), 8)
    block_r = min(next_pow2(PT * PS), max(1, 4096 // (block_c * block_w)))
    return {"BLOCK_C": block_c, "BLOCK_R": block_r, "BLOCK_W": block_w,
            "num_warps": 8 if block_c * block_r * block_w >= 2048 else 4}
