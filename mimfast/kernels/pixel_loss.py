"""Triton kernels for the masked reconstruction losses (MAE, VideoMAE, SimMIM).

A loss call is three launches: ``weight_sum_kernel`` (a few programs sum the row weights of the mask into at
most MAX_WPARTS fp32 partials; skipped without a mask), ``pixel_loss_kernel`` (each program takes a tile of whole
predicted patches, :func:`rows_per_program` of them: it loads the prediction rows and the matching patches of the
image, computed from the patch indices, no patchified copy of the image, normalises the targets in registers with
fp32 statistics, writes the gradient of the loss for the rows, Liger style, and one fp32 partial of the weighted
error), and ``loss_finalize_kernel`` (one program sums the partials in a fixed order: deterministic, no float
atomics). Rows whose weight is 0 skip every load and write a zero gradient. The backward pass is
``scale_inplace_kernel``, which multiplies the stored gradient by the incoming one in place and does nothing when
that factor is exactly 1. ``masked_ids_kernel`` lists the masked tokens of a bool mask (VideoMAE) with one program
per sample.

The loss kernel holds a row in pred's flat order e = s * C + c (s = (t, row, col) inside the patch or cube, c =
channel: the order of ``patchify``), so pred and its gradient move as contiguous vectors; each image value is
read at its own place in the image. SimMIM's kernel holds a patch as a tile [BLOCK_S, BLOCK_C], read in the
image's order [BLOCK_C, BLOCK_S] (runs of ``p`` neighbouring pixels) and transposed in registers.

Target normalisation ``NORM``: 0 none, 1 per patch (MAE norm_pix: (x - mean) / sqrt(var + eps), unbiased var over
all P values), 2 per channel over the cube (VideoMAE: (x - mean) / (std_unbiased + eps)).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mimfast.kernels.gather_patches import (
    image_order_offsets,
    patch_base,
    patch_offsets,
    pixel_offsets,
    to_patch_order,
    transposes,
)
from mimfast.kernels.sizes import cdiv, next_pow2, sm_count


@triton.jit
def _image_tile(img_ptr, n, l, ok, GH, GW, s_n, s_c, s_t, s_h, s_w,
                C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The patch ``l`` of image ``n`` as fp32 [BLOCK_S, BLOCK_C] (zeros outside the patch, and everywhere when
    ``ok`` is false: then nothing is read)."""
    s = tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    # offsets inside a patch fit in int32 (the ops' backend reasons check): 32-bit per-element arithmetic and registers,
    # the int64 part is the patch's base pointer only
    off = c[:, None] * s_c + pixel_offsets(s, s_t, s_h, s_w, PS)[None, :]
    valid = tl.where(ok, (c < C)[:, None] & (s < PT * PS * PS)[None, :], False)
    base = patch_base(img_ptr, n, l, GH, GW, s_n, s_t, s_h, s_w, PT, PS)
    x = tl.load(base + off, mask=valid, other=0.0).to(tl.float32)
    return tl.trans(x)


@triton.jit
def _error_terms(pred, x, valid, L1: tl.constexpr):
    """Elementwise error of ``pred`` against ``x`` and its derivative for ``pred`` (fp32), 0 outside ``valid``."""
    diff = tl.where(valid, pred - x, 0.0)
    if L1:
        err = tl.abs(diff)
        g = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    else:
        err = diff * diff
        g = 2.0 * diff
    return err, g


@triton.jit
def _inv_denom(wpart_ptr, num_wparts, row_count, P: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr):
    """1 / (P * sum of the row weights), or 1 / P when they sum to 0 (as the reference divides by 1 then: 0 for
    all-zero weights, whose rows are skipped); summed in a fixed order."""
    if HAS_MASK:
        g = tl.arange(0, BLOCK_G)
        w_sum = tl.sum(tl.load(wpart_ptr + g, mask=g < num_wparts, other=0.0), axis=0)
    else:
        w_sum = row_count
    return 1.0 / (tl.where(w_sum != 0, w_sum, 1.0) * P)


@triton.jit
def weight_sum_kernel(
    ids_ptr,  # [N, R] int64 patch index of each row (HAS_IDS)
    mask_ptr,  # [N, L] weight of each patch, float or uint8
    wpart_ptr,  # [num_programs] fp32 partial sums of the row weights
    total_rows, R,  # N * R, rows per sample
    s_in, s_ir, s_mn, s_ml,  # ids and mask strides
    HAS_IDS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, total_rows, tl.num_programs(0) * BLOCK):
        i = start + tl.arange(0, BLOCK).to(tl.int64)
        valid = i < total_rows
        n = i // R
        r = i % R
        if HAS_IDS:
            l = tl.load(ids_ptr + n * s_in + r * s_ir, mask=valid, other=0)
        else:
            l = r
        acc += tl.load(mask_ptr + n * s_mn + l * s_ml, mask=valid, other=0).to(tl.float32)
    tl.store(wpart_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _by_channel(table_ptr, ec, ok, C: tl.constexpr):
    """table[ec] (fp32) where ``ok``, else 0: C uniform scalar loads and selects, instead of a load per value."""
    v = tl.where(ec == 0, tl.load(table_ptr), 0.0)
    for c in tl.static_range(1, C):
        v = tl.where(ec == c, tl.load(table_ptr + c), v)
    return tl.where(ok, v, 0.0)


@triton.jit
def _channel(x, ec, c: tl.constexpr):
    """x where e's channel is c, else 0."""
    return tl.where((ec == c)[None, :], x, 0.0)


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _channel_sums(x, ec):
    """Per-row sums of x over each of the channels 0..3 at once, as one reduction (a channel past C sums zeros)."""
    return tl.reduce((_channel(x, ec, 0), _channel(x, ec, 1), _channel(x, ec, 2), _channel(x, ec, 3)), 1, _add4)


@triton.jit
def _per_channel(v0, v1, v2, v3, ec):
    """[ROWS, BLOCK_P] holding row statistic v<c> at every value of channel c (C <= 4)."""
    out = tl.where((ec == 0)[None, :], v0[:, None], v1[:, None])
    out = tl.where((ec == 2)[None, :], v2[:, None], out)
    return tl.where((ec == 3)[None, :], v3[:, None], out)


@triton.jit
def _target_in_patch_order(base, ok, ld, e, ec, e_ok, stats_ptr, eps, s_c, s_t, s_h, s_w,
                           C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK_P: tl.constexpr, NORM: tl.constexpr, UNNORM: tl.constexpr,
                           CHANNEL_SUMS: tl.constexpr):
    """The normalised targets of ROWS patches [ROWS, BLOCK_P] in patchify order e = s * C + c, each value read at
    its place in the image (values outside ``ld`` are for the caller to mask)."""
    S: tl.constexpr = PT * PS * PS
    P: tl.constexpr = S * C
    img_off = patch_offsets(e, s_c, s_t, s_h, s_w, C, PS)
    x = tl.load(base[:, None] + img_off[None, :], mask=ld, other=0.0).to(tl.float32)
    if UNNORM:
        x = x * _by_channel(stats_ptr + C, ec, e_ok, C)[None, :] + _by_channel(stats_ptr, ec, e_ok, C)[None, :]
    # statistics of x - (the patch's first value, of channel 0 or of each channel): a constant patch gives exactly
    # 0 deviation instead of rounding noise that 1 / (std + eps) would amplify up to 1e6-fold, and large offsets
    # lose no precision; the first values are loads of their own, not reductions
    if NORM == 1:
        x0 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
        if UNNORM:
            x0 = x0 * tl.load(stats_ptr + C) + tl.load(stats_ptr)
        x = tl.where(ld, x - x0[:, None], 0.0)
        d = tl.where(ld, x - (tl.sum(x, axis=1) / P)[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / (P - 1)
        x = d / tl.sqrt(var + eps)[:, None]
    elif NORM == 2:
        x0 = tl.zeros([ROWS, BLOCK_P], tl.float32)
        for c in tl.static_range(C):
            x0c = tl.load(base + c * s_c, mask=ok, other=0.0).to(tl.float32)
            if UNNORM:
                x0c = x0c * tl.load(stats_ptr + C + c) + tl.load(stats_ptr + c)
            x0 = tl.where((ec == c)[None, :], x0c[:, None], x0)
        x = tl.where(ld, x - x0, 0.0)
        if (CHANNEL_SUMS and C >= 2) and C <= 4:  # no chained boolean operators in Triton 3.0
            # the same two passes, each channel's sum in one reduction for all channels
            m0, m1, m2, m3 = _channel_sums(x, ec)
            d = tl.where(ld, x - _per_channel(m0 / S, m1 / S, m2 / S, m3 / S, ec), 0.0)
            v0, v1, v2, v3 = _channel_sums(d * d, ec)
            std = _per_channel(tl.sqrt(v0 / (S - 1)), tl.sqrt(v1 / (S - 1)), tl.sqrt(v2 / (S - 1)),
                               tl.sqrt(v3 / (S - 1)), ec)
            x = d / (std + eps)
        else:
            mean = tl.zeros([ROWS, BLOCK_P], tl.float32)
            for c in tl.static_range(C):
                sel = (ec == c)[None, :]
                mean = tl.where(sel, (tl.sum(tl.where(sel, x, 0.0), axis=1) / S)[:, None], mean)
            d = tl.where(ld, x - mean, 0.0)
            std = tl.zeros([ROWS, BLOCK_P], tl.float32)
            for c in tl.static_range(C):
                sel = (ec == c)[None, :]
                std = tl.where(sel, tl.sqrt(tl.sum(tl.where(sel, d * d, 0.0), axis=1) / (S - 1))[:, None], std)
            x = d / (std + eps)
    return x


@triton.jit
def _target_in_image_order(base, ok, stats_ptr, eps, s_c, s_t, s_h, s_w, C: tl.constexpr, PT: tl.constexpr,
                           PS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                           BLOCK_P: tl.constexpr, NORM: tl.constexpr, UNNORM: tl.constexpr):
    """The targets of ROWS patches read and normalised in the image's order [ROWS, BLOCK_C, BLOCK_S] (runs of PS
    pixels as 16-byte vectors; a channel's statistics are one reduction along its pixels, all channels at once),
    then moved into patchify order [ROWS, BLOCK_P] (kernels.gather_patches.to_patch_order). Positions past P hold
    a copy of another value: the caller masks them. The same statistics as :func:`_target_in_patch_order`, first
    values and all; only the order of the terms in each sum differs."""
    S: tl.constexpr = PT * PS * PS
    P: tl.constexpr = S * C
    off, inside = image_order_offsets(s_c, s_t, s_h, s_w, C, PT, PS, BLOCK_C, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    ld = ok[:, None, None] & inside[None, :, :]
    x = tl.load(base[:, None, None] + off[None, :, :], mask=ld, other=0.0).to(tl.float32)
    if UNNORM:
        scale = tl.load(stats_ptr + C + c, mask=c_ok, other=0.0)
        shift = tl.load(stats_ptr + c, mask=c_ok, other=0.0)
        x = x * scale[None, :, None] + shift[None, :, None]
    if NORM == 1:
        x0 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
        if UNNORM:
            x0 = x0 * tl.load(stats_ptr + C) + tl.load(stats_ptr)
        x = tl.where(ld, x - x0[:, None, None], 0.0)
        d = tl.where(ld, x - (tl.sum(tl.sum(x, axis=2), axis=1) / P)[:, None, None], 0.0)
        var = tl.sum(tl.sum(d * d, axis=2), axis=1) / (P - 1)
        x = d / tl.sqrt(var + eps)[:, None, None]
    elif NORM == 2:
        x0 = tl.load(base[:, None] + c[None, :] * s_c, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        if UNNORM:
            x0 = x0 * scale[None, :] + shift[None, :]
        x = tl.where(ld, x - x0[:, :, None], 0.0)
        d = tl.where(ld, x - (tl.sum(x, axis=2) / S)[:, :, None], 0.0)
        std = tl.sqrt(tl.sum(d * d, axis=2) / (S - 1))
        x = d / (std + eps)[:, :, None]
    return to_patch_order(x, C, S, ROWS, BLOCK_C, BLOCK_S, BLOCK_P)


@triton.jit
def pixel_loss_kernel(
    pred_ptr,  # [N, R, P] predicted rows, any strides
    grad_ptr,  # [N, R, P] gradient of the loss for pred, last dim contiguous (may alias pred_ptr)
    img_ptr,  # [N, C, T, H, W] images (T = 1 for 2-D images), any strides
    ids_ptr,  # [N, R] int64 patch index of each pred row (HAS_IDS), else row r is patch r
    mask_ptr,  # [N, L] weight of each patch (HAS_MASK), float or uint8; without it every row weighs 1
    stats_ptr,  # [2, C] fp32 per-channel mean then std to un-normalise the images with (UNNORM)
    wpart_ptr,  # [num_wparts] fp32 partial sums of every row's weight (HAS_MASK), from weight_sum_kernel
    partial_ptr,  # [cdiv(N * R, ROWS)] fp32 weighted error sum of each program's rows
    total_rows, R, GH, GW,  # N * R, rows per sample, patch grid height and width
    num_wparts, row_count,  # weight partials; without mask the number of rows of the whole loss (fp32)
    s_pn, s_pr, s_pe,  # pred strides
    s_gn, s_gr,  # grad strides (last dim contiguous)
    s_n, s_c, s_t, s_h, s_w,  # image strides
    s_in, s_ir,  # ids strides
    s_mn, s_ml,  # mask strides
    eps,
    C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr,
    BLOCK_P: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr,
    NORM: tl.constexpr, L1: tl.constexpr, UNNORM: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_GRAD: tl.constexpr, LATE_PRED: tl.constexpr,
    CHANNEL_SUMS: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    S: tl.constexpr = PT * PS * PS
    P: tl.constexpr = S * C
    inv_denom = _inv_denom(wpart_ptr, num_wparts, row_count, P, HAS_MASK, BLOCK_G)
    # the tile is [ROWS, BLOCK_P]: ROWS whole rows at once, each in pred's own flat order e = s * C + c, so the
    # pred loads and gradient stores are contiguous vectors, and every reduction serves ROWS rows. The image value
    # of each e is read at its place in the image: one offset table for the program, plus each row's patch base;
    # with TRANSPOSE the patches are read in the image's order and moved into pred's in registers
    # (kernels.gather_patches).
    e = tl.arange(0, BLOCK_P)
    e_ok = e < P
    ec = e % C
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rows_ok = rows < total_rows
    n = rows // R
    r = rows % R
    if HAS_IDS:
        l = tl.load(ids_ptr + n * s_in + r * s_ir, mask=rows_ok, other=0).to(tl.int32)
    else:
        l = r.to(tl.int32)
    if HAS_MASK:
        w = tl.load(mask_ptr + n * s_mn + l * s_ml, mask=rows_ok, other=0).to(tl.float32)
    else:
        w = tl.where(rows_ok, 1.0, 0.0)
    # a row past the end or of weight 0 reads nothing; its error is 0 and its gradient is written as exact zeros
    ok = rows_ok & (w != 0.0)
    ld = ok[:, None] & e_ok[None, :]
    # row offsets are multiples of ROW_ALIGN (the launcher's finding from the strides): pred rows of P 588 (ViT-H)
    # then move as 8-byte vectors, where Triton's own hint (a stride divisible by 16) would leave single values
    pred_ptrs = pred_ptr + tl.multiple_of(n * s_pn + r * s_pr, ROW_ALIGN)[:, None] + (e * s_pe)[None, :]
    if not LATE_PRED:
        pred = tl.load(pred_ptrs, mask=ld, other=0.0).to(tl.float32)
    base = patch_base(img_ptr, n, l, GH, GW, s_n, s_t, s_h, s_w, PT, PS)
    if TRANSPOSE:
        x = tl.where(ld, _target_in_image_order(base, ok, stats_ptr, eps, s_c, s_t, s_h, s_w, C, PT, PS, ROWS,
                                                BLOCK_C, BLOCK_S, BLOCK_P, NORM, UNNORM), 0.0)
    else:
        x = _target_in_patch_order(base, ok, ld, e, ec, e_ok, stats_ptr, eps, s_c, s_t, s_h, s_w, C, PT, PS, ROWS,
                                   BLOCK_P, NORM, UNNORM, CHANNEL_SUMS)
    if LATE_PRED:  # loaded once the target is ready: fewer live registers while its statistics are reduced
        pred = tl.load(pred_ptrs, mask=ld, other=0.0).to(tl.float32)
    err, g = _error_terms(pred, x, ld, L1)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(ok, w * tl.sum(err, axis=1), 0.0), axis=0))
    if COMPUTE_GRAD:
        g = tl.where(ok[:, None], g * (w * inv_denom)[:, None], 0.0)
        tl.store(grad_ptr + tl.multiple_of(n * s_gn + r * s_gr, ROW_ALIGN)[:, None] + e[None, :],
                 g.to(grad_ptr.dtype.element_ty),
                 mask=rows_ok[:, None] & e_ok[None, :])


@triton.jit
def loss_finalize_kernel(
    partial_ptr,  # [num_partials] fp32 weighted error sums
    wpart_ptr,  # [num_wparts] fp32 partial sums of the row weights (HAS_MASK)
    bad_ptr,  # [num_bad] int32, nonzero: the loss is undefined (HAS_BAD)
    loss_ptr,  # [] the loss, in its own dtype
    num_partials, num_wparts, row_count, num_bad,
    P: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr,
):
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, num_partials, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + i, mask=i < num_partials, other=0.0)
    loss = tl.sum(acc, axis=0) * _inv_denom(wpart_ptr, num_wparts, row_count, P, HAS_MASK, BLOCK_G)
    if HAS_BAD:
        bad = tl.zeros([BLOCK], tl.int32)
        for start in range(0, num_bad, BLOCK):
            i = start + tl.arange(0, BLOCK)
            bad += tl.load(bad_ptr + i, mask=i < num_bad, other=0)
        loss = tl.where(tl.max(bad, axis=0) != 0, float("nan"), loss)
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@triton.jit
def scale_inplace_kernel(
    x_ptr,  # [numel] contiguous, scaled in place
    scale_ptr,  # [] the factor
    numel,
    BLOCK: tl.constexpr,
):
    # the factor is almost always exactly 1 (loss.backward()): then the pass is skipped on the device, without the
    # host synchronisation a check on the host would need
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, numel, tl.num_programs(0) * BLOCK):
            i = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + i, mask=i < numel)
            tl.store(x_ptr + i, (x.to(tl.float32) * scale).to(x_ptr.dtype.element_ty), mask=i < numel)


@triton.jit
def masked_ids_kernel(
    mask_ptr,  # [N, L] bool as uint8
    ids_ptr,  # [N, R] int64: the first R masked tokens of each sample, ascending
    bad_ptr,  # [N] int32: 1 where the sample does not mask exactly R tokens
    L, R, s_mn, s_ml,
    BLOCK_L: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    count = tl.full([], 0, tl.int32)
    for start in range(0, L, BLOCK_L):
        l = start + tl.arange(0, BLOCK_L)
        m = tl.load(mask_ptr + n * s_mn + l * s_ml, mask=l < L, other=0) != 0
        pos = count + tl.cumsum(m.to(tl.int32), axis=0) - 1
        tl.store(ids_ptr + n * R + pos, l.to(tl.int64), mask=m & (pos < R))
        count += tl.sum(m.to(tl.int32), axis=0)
    # rows past the sample's own count still hold a valid patch index (the loss is NaN then anyway)
    for start in range(0, R, BLOCK_L):
        j = start + tl.arange(0, BLOCK_L)
        tl.store(ids_ptr + n * R + j, tl.zeros([BLOCK_L], tl.int64), mask=(j >= count) & (j < R))
    tl.store(bad_ptr + n, (count != R).to(tl.int32))


@triton.jit
def simmim_loss_kernel(
    pred_ptr,  # [N, C, H, W] reconstructed images, any strides
    grad_ptr,  # [N, C, H, W] gradient of the loss for pred, any strides
    img_ptr,  # [N, C, H, W] images, any strides
    mask_ptr,  # [N, L] weight of each patch, float or uint8
    inv_denom_ptr,  # [1] fp32, 1 / denominator of the loss
    partial_ptr,  # [N * L] fp32 weighted error sum of each patch
    L, GH, GW,
    s_pn, s_pc, s_ph, s_pw,  # pred strides
    s_gn, s_gc, s_gh, s_gw,  # grad strides
    s_n, s_c, s_h, s_w,  # image strides
    s_mn, s_ml,  # mask strides
    C: tl.constexpr, PS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = row // L
    l = row % L
    w = tl.load(mask_ptr + n * s_mn + l * s_ml).to(tl.float32)
    s = tl.arange(0, BLOCK_S)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    valid = (s < PS * PS) & (c < C)
    if w != 0.0:
        pred = _image_tile(pred_ptr, n, l, True, GH, GW, s_pn, s_pc, 0, s_ph, s_pw, C, 1, PS, BLOCK_S, BLOCK_C)
        x = _image_tile(img_ptr, n, l, True, GH, GW, s_n, s_c, 0, s_h, s_w, C, 1, PS, BLOCK_S, BLOCK_C)
        err, g = _error_terms(pred, x, valid, True)
        total = w * tl.sum(tl.sum(err, axis=1), axis=0)
        g = g * (w * tl.load(inv_denom_ptr))
        tl.store(partial_ptr + row, total)
    else:
        tl.store(partial_ptr + row, 0.0)
        g = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    if COMPUTE_GRAD:
        gh = (l // GW) % GH
        gw = l % GW
        g_off = (n * s_gn + c * s_gc + (gh * PS + s // PS) * s_gh + (gw * PS + s % PS) * s_gw)
        tl.store(grad_ptr + g_off, g.to(grad_ptr.dtype.element_ty), mask=valid)


def _tile(C: int, S: int) -> tuple[int, int, int]:
    block_s, block_c = next_pow2(S), next_pow2(C)
    return block_s, block_c, max(1, min(16, block_s * block_c // 256))


def _strides5(imgs: torch.Tensor) -> tuple[int, ...]:
    """Strides of an image batch seen as [N, C, T, H, W]."""
    if imgs.dim() == 4:
        return (imgs.stride(0), imgs.stride(1), 0, imgs.stride(2), imgs.stride(3))
    return tuple(imgs.stride())


# the loss kernel's tile: whole rows up to LOSS_TILE values per program (P rounded up to a power of 2; half as many
# with per-channel statistics, whose extra reductions favour more, smaller programs), LOSS_WARPS warps. Chosen with
# benchmarks.sweep on the H100 (bf16): ViT-B P 768 fwd+bwd 0.123 ms at 4096 / 4 warps against 0.136 at 2048, 0.143
# at 8192 and 0.137 at 4096 / 8 warps; VideoMAE-B P 1536 0.681 ms at 2048 / 4 warps against 0.862 at 4096.
# Weight partials: at most MAX_WPARTS, read by every loss program.
LOSS_TILE = 4096
LOSS_WARPS = 4
# load pred after the target's statistics instead of with the image (fewer live registers, less overlap); not yet
# timed on a GPU, so off
LATE_PRED = False
# per-channel statistics (VideoMAE, 2 <= C <= 4) with every channel's sum in one reduction: two reductions of the
# tile (means, then squared deviations) instead of 2 C; the same arithmetic. Not yet timed on a GPU, so off
CHANNEL_SUMS = False
# the targets read and normalised in the image's own order, then transposed in registers (kernels.gather_patches,
# _target_in_image_order). Static sm_90 count (Triton 3.6, fp32 images, bf16 pred): ViT-B 10 16-byte global loads
# a thread instead of 4 and 31 4-byte ones, 96 registers instead of 64 (72 with LATE_PRED); VideoMAE-B 40 registers
# instead of 80 (12 blocks an SM instead of 6) and 10 barriers instead of 24, a channel's statistics being one
# reduction along its pixels. None (the default): only with per-channel statistics (VideoMAE), where the static
# count is better on every line (ViT-B's trades registers for vector loads); True / False force it. Neither is
# timed on a GPU yet (sweep:loss times both)
TRANSPOSE: Optional[bool] = None
MAX_WPARTS = 64
_WEIGHT_BLOCK = 1024
# the final pass is one program whose loop waits on each step's loads: wide steps, few of them (VideoMAE-B's 90k
# partials, one per row, took 22 us on the H100 in steps of 2048)
_FINAL_BLOCK = 16384
_FINAL_WARPS = 16


def rows_per_program(P: int, norm: int = 0) -> int:
    """Rows of P values each that one loss program takes (a power of 2), for normalisation ``norm``."""
    fit = max(1, min(16, (LOSS_TILE // 2 if norm == 2 else LOSS_TILE) // next_pow2(P)))
    return 1 << (fit.bit_length() - 1)


def row_align(*strides: int) -> int:
    """The largest power of 2 up to 16 that divides every one of ``strides`` (elements)."""
    align = 16
    for s in strides:
        while s % align:
            align //= 2
    return align


def loss_warps(tile: int) -> int:
    """Warps of a loss program of ``tile`` values: LOSS_WARPS (fewer for a tile under 256 values each), more for a
    tile beyond 32 values a thread (a single row of a big cube: P 6144 at 4 warps needs 255 registers)."""
    return max(1, min(LOSS_WARPS, tile // 256), min(16, tile // 1024))


def num_partials(rows: int, P: int, norm: int = 0) -> int:
    """Length of the partials buffer the loss kernel fills for ``rows`` rows of P values."""
    return cdiv(rows, rows_per_program(P, norm))


def launch_weight_sums(mask: torch.Tensor, ids: Optional[torch.Tensor], rows_per_sample: int) -> torch.Tensor:
    """[G] fp32 partial sums of the row weights mask[n, ids[n, r]] (mask[n, r] without ids), G <= MAX_WPARTS."""
    N = mask.shape[0]
    total = N * rows_per_sample
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    grid = max(1, min(MAX_WPARTS, cdiv(total, _WEIGHT_BLOCK)))
    wparts = torch.empty(grid, dtype=torch.float32, device=mask.device)
    weight_sum_kernel[(grid,)](
        ids if ids is not None else mask, mask, wparts, total, max(rows_per_sample, 1),
        *(ids.stride() if ids is not None else (0, 0)), *mask.stride(),
        HAS_IDS=ids is not None, BLOCK=_WEIGHT_BLOCK, num_warps=4,
    )
    return wparts


def launch_pixel_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    ids: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    wparts: Optional[torch.Tensor],
    row_count: int,
    partials: torch.Tensor,
    grad: Optional[torch.Tensor],
    patch_size: int,
    tubelet_size: int,
    norm: int,
    l1: bool,
    eps: float,
    stats: Optional[torch.Tensor] = None,
) -> None:
    """Fill ``partials`` [num_partials(N*R)] with the weighted error sums of each program's rows and ``grad``
    [N,R,P] (if given, may be ``pred`` itself) with d(loss)/d(pred), where loss = partials.sum() / (P * W): W is the
    sum of ``wparts`` (from :func:`launch_weight_sums`, over every row of the loss) when ``mask`` is given, else
    ``row_count``.

    pred [N,R,P], imgs [N,C,H,W] or [N,C,T,H,W], ids [N,R] int64 or None (row r is patch r), mask [N,L] weights
    or None (all 1), stats [2,C] fp32 mean/std to un-normalise the images with, or None.
    """
    N, R, P = pred.shape
    C = imgs.shape[1]
    PT, PS = tubelet_size, patch_size
    GH, GW = imgs.shape[-2] // PS, imgs.shape[-1] // PS
    assert P == C * PT * PS * PS
    rows = rows_per_program(P, norm)
    block_p = next_pow2(P)
    S = PT * PS * PS
    # patches transposed only where that pads them no more than the row tile does (C 3: 4 x 2^k against 3 x 2^k)
    # norm 2: per-channel statistics (NORM_CHANNEL)
    transpose = transposes(C, S, imgs.stride(-1) == 1, norm == 2 if TRANSPOSE is None else TRANSPOSE, block_p)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    if grad is not None:
        assert grad.stride(2) == 1 and grad.shape == pred.shape
    assert (mask is None) == (wparts is None)
    programs = cdiv(N * R, rows)
    assert partials.numel() == programs, "partials sized for another tile"
    # the callers' backend reasons refused in-patch offsets past int32
    dummy = partials
    pixel_loss_kernel[(programs,)](
        pred, grad if grad is not None else dummy, imgs,
        ids if ids is not None else dummy, mask if mask is not None else dummy,
        stats if stats is not None else dummy, wparts if wparts is not None else dummy, partials,
        N * R, max(R, 1), GH, GW, 0 if wparts is None else wparts.numel(), float(row_count),
        *pred.stride(),
        *(grad.stride()[:2] if grad is not None else (0, 0)),
        *_strides5(imgs),
        *(ids.stride() if ids is not None else (0, 0)),
        *(mask.stride() if mask is not None else (0, 0)),
        eps,
        C=C, PT=PT, PS=PS, BLOCK_P=block_p, ROWS=rows, BLOCK_G=MAX_WPARTS,
        NORM=norm, L1=l1, UNNORM=stats is not None,
        HAS_IDS=ids is not None, HAS_MASK=mask is not None, COMPUTE_GRAD=grad is not None, LATE_PRED=LATE_PRED,
        CHANNEL_SUMS=CHANNEL_SUMS, TRANSPOSE=transpose, BLOCK_C=next_pow2(C), BLOCK_S=next_pow2(S),
        ROW_ALIGN=row_align(*pred.stride()[:2], *(grad.stride()[:2] if grad is not None else ())),
        num_warps=loss_warps(rows * block_p),
    )


def launch_loss_finalize(partials: torch.Tensor, wparts: Optional[torch.Tensor], row_count: int, P: int,
                         dtype: torch.dtype, bad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loss, a 0-dim tensor of ``dtype``: partials.sum() / (P * W) with W as in :func:`launch_pixel_loss`;
    NaN where ``bad`` (int32) has a nonzero entry."""
    loss = torch.empty((), dtype=dtype, device=partials.device)
    dummy = partials
    loss_finalize_kernel[(1,)](
        partials, wparts if wparts is not None else dummy, bad if bad is not None else dummy, loss,
        partials.numel(), 0 if wparts is None else wparts.numel(), float(row_count),
        0 if bad is None else bad.numel(),
        P=P, HAS_MASK=wparts is not None, HAS_BAD=bad is not None, BLOCK=_FINAL_BLOCK, BLOCK_G=MAX_WPARTS,
        num_warps=_FINAL_WARPS,
    )
    return loss


def _programs(device: torch.device) -> int:
    """A grid filling the device a few times over (grid-stride loops)."""
    return 4 * sm_count(device) if device.type == "cuda" else 4


def launch_scale_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x *= scale in place (x contiguous, scale a 0-dim tensor on x's device); nothing moves when scale == 1."""
    block = 4096
    grid = max(1, min(_programs(x.device), cdiv(x.numel(), block)))
    scale_inplace_kernel[(grid,)](x, scale, x.numel(), BLOCK=block, num_warps=8)
    return x


def launch_masked_ids(mask: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, L] bool -> ([N, rows] int64 indices of the first ``rows`` masked tokens of each sample, ascending;
    [N] int32 flags, 1 where a sample does not mask exactly ``rows`` tokens)."""
    N, L = mask.shape
    ids = torch.empty(N, rows, dtype=torch.int64, device=mask.device)
    bad = torch.empty(N, dtype=torch.int32, device=mask.device)
    if N > 0:
        block = min(2048, next_pow2(max(L, 1)))
        masked_ids_kernel[(N,)](mask.view(torch.uint8), ids, bad, L, rows, *mask.stride(), BLOCK_L=block,
                                num_warps=4)
    return ids, bad


def launch_simmim_loss(
    pred_imgs: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    inv_denom: torch.Tensor,
    partials: torch.Tensor,
    grad: Optional[torch.Tensor],
    patch_size: int,
) -> None:
    """Fill ``partials`` [N*L] with each patch's weighted L1 sum and ``grad`` [N,C,H,W] (if given) with
    d(loss)/d(pred_imgs), where loss = partials.sum() * inv_denom; mask [N,L] weights at patch granularity."""
    N, C, H, W = imgs.shape
    PS = patch_size
    GH, GW = H // PS, W // PS
    block_s, block_c, warps = _tile(C, PS * PS)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    simmim_loss_kernel[(N * GH * GW,)](
        pred_imgs, grad if grad is not None else partials, imgs, mask, inv_denom, partials,
        GH * GW, GH, GW,
        *pred_imgs.stride(),
        *(grad.stride() if grad is not None else (0, 0, 0, 0)),
        *imgs.stride(),
        *mask.stride(),
        C=C, PS=PS, BLOCK_S=block_s, BLOCK_C=block_c, COMPUTE_GRAD=grad is not None,
        num_warps=warps,
    )
