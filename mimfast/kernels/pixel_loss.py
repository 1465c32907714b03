"""Triton kernels for the masked reconstruction losses (MAE, VideoMAE, SimMIM).

One program handles one predicted patch: it loads the prediction row and the matching patch of the image
(computed from the patch index, no patchified copy of the image), normalises the target in registers with
fp32 statistics, and writes both the row's weighted error sum (a per-row partial, summed afterwards in a fixed
order, so the loss is deterministic) and the gradient of the loss for the prediction row (Liger style: the
backward pass only scales it by the incoming gradient). Rows whose weight is 0 skip every load and write a zero
gradient.

A patch is held as a tile [BLOCK_S, BLOCK_C]: s = (t, row, col) inside the patch (or cube), c = channel, so the
flattened patch index is s * C + c, the (row, col, channel) order of ``patchify``. The image is read in its own
order [BLOCK_C, BLOCK_S] (runs of ``p`` neighbouring pixels) and transposed in registers.

Target normalisation ``NORM``: 0 none, 1 per patch (MAE norm_pix: (x - mean) / sqrt(var + eps), unbiased var over
all P values), 2 per channel over the cube (VideoMAE: (x - mean) / (std_unbiased + eps)).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _image_tile(img_ptr, n, l, GH, GW, s_n, s_c, s_t, s_h, s_w,
                C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The patch ``l`` of image ``n`` as fp32 [BLOCK_S, BLOCK_C] (zeros outside the patch)."""
    gt = l // (GH * GW)
    gh = (l // GW) % GH
    gw = l % GW
    s = tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    base = n * s_n + gt * PT * s_t + gh * PS * s_h + gw * PS * s_w
    inner = (s // (PS * PS)) * s_t + ((s // PS) % PS) * s_h + (s % PS) * s_w
    off = base + c[:, None] * s_c + inner[None, :]
    valid = (c < C)[:, None] & (s < PT * PS * PS)[None, :]
    x = tl.load(img_ptr + off, mask=valid, other=0.0).to(tl.float32)
    return tl.trans(x)


@triton.jit
def _error_and_grad(pred, x, valid, w, inv_denom, L1: tl.constexpr):
    """Weighted error sum of one row and its gradient for ``pred`` (fp32)."""
    diff = tl.where(valid, pred - x, 0.0)
    if L1:
        err = tl.abs(diff)
        g = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    else:
        err = diff * diff
        g = 2.0 * diff
    return w * tl.sum(tl.sum(err, axis=1), axis=0), g * (w * inv_denom)


@triton.jit
def pixel_loss_kernel(
    pred_ptr,  # [N, R, P] predicted rows, any strides
    grad_ptr,  # [N, R, P] gradient of the loss for pred, last dim contiguous (may alias pred_ptr)
    img_ptr,  # [N, C, T, H, W] images (T = 1 for 2-D images), any strides
    ids_ptr,  # [N, R] int64 patch index of each pred row (HAS_IDS), else row r is patch r
    mask_ptr,  # [N, L] weight of each patch (HAS_MASK), float or uint8; without it every row weighs 1
    stats_ptr,  # [2, C] fp32 per-channel mean then std to un-normalise the images with (UNNORM)
    inv_denom_ptr,  # [1] fp32, 1 / denominator of the loss
    partial_ptr,  # [N * R] fp32 weighted error sum of each row
    R, GH, GW,  # rows per sample, patch grid height and width
    s_pn, s_pr, s_pe,  # pred strides
    s_gn, s_gr,  # grad strides (last dim contiguous)
    s_n, s_c, s_t, s_h, s_w,  # image strides
    s_in, s_ir,  # ids strides
    s_mn, s_ml,  # mask strides
    eps,
    C: tl.constexpr, PT: tl.constexpr, PS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    NORM: tl.constexpr, L1: tl.constexpr, UNNORM: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = row // R
    r = row % R
    if HAS_IDS:
        l = tl.load(ids_ptr + n * s_in + r * s_ir)
    else:
        l = r
    if HAS_MASK:
        w = tl.load(mask_ptr + n * s_mn + l * s_ml).to(tl.float32)
    else:
        w = 1.0
    S: tl.constexpr = PT * PS * PS
    s = tl.arange(0, BLOCK_S)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    valid = (s < S) & (c < C)
    e = s * C + c
    g_off = n * s_gn + r * s_gr + e
    if w != 0.0:
        pred = tl.load(pred_ptr + n * s_pn + r * s_pr + e * s_pe, mask=valid, other=0.0).to(tl.float32)
        x = _image_tile(img_ptr, n, l, GH, GW, s_n, s_c, s_t, s_h, s_w, C, PT, PS, BLOCK_S, BLOCK_C)
        if UNNORM:
            cc = tl.arange(0, BLOCK_C)
            mean_c = tl.load(stats_ptr + cc, mask=cc < C, other=0.0)
            std_c = tl.load(stats_ptr + C + cc, mask=cc < C, other=0.0)
            x = tl.where(valid, x * std_c[None, :] + mean_c[None, :], 0.0)
        # Statistics of x - (first value): a constant patch then gives exactly 0 deviation instead of rounding
        # noise that 1 / (std + eps) would amplify up to 1e6-fold, and large offsets lose no precision.
        if NORM == 1:
            x = tl.where(valid, x - tl.sum(tl.sum(tl.where((s == 0) & (c == 0), x, 0.0), axis=1), axis=0), 0.0)
            d = tl.where(valid, x - tl.sum(tl.sum(x, axis=1), axis=0) / (S * C), 0.0)
            var = tl.sum(tl.sum(d * d, axis=1), axis=0) / (S * C - 1)
            x = d / tl.sqrt(var + eps)
        elif NORM == 2:
            x = tl.where(valid, x - tl.sum(tl.where(s == 0, x, 0.0), axis=0)[None, :], 0.0)
            d = tl.where(valid, x - (tl.sum(x, axis=0) / S)[None, :], 0.0)
            std_c = tl.sqrt(tl.sum(d * d, axis=0) / (S - 1))
            x = d / (std_c[None, :] + eps)
        total, g = _error_and_grad(pred, x, valid, w, tl.load(inv_denom_ptr), L1)
        tl.store(partial_ptr + row, total)
        if COMPUTE_GRAD:
            tl.store(grad_ptr + g_off, g.to(grad_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(partial_ptr + row, 0.0)
        if COMPUTE_GRAD:
            tl.store(grad_ptr + g_off, tl.zeros([BLOCK_S, BLOCK_C], grad_ptr.dtype.element_ty), mask=valid)


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
        pred = _image_tile(pred_ptr, n, l, GH, GW, s_pn, s_pc, 0, s_ph, s_pw, C, 1, PS, BLOCK_S, BLOCK_C)
        x = _image_tile(img_ptr, n, l, GH, GW, s_n, s_c, 0, s_h, s_w, C, 1, PS, BLOCK_S, BLOCK_C)
        total, g = _error_and_grad(pred, x, valid, w, tl.load(inv_denom_ptr), True)
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
    block_s, block_c = triton.next_power_of_2(S), triton.next_power_of_2(C)
    return block_s, block_c, max(1, min(16, block_s * block_c // 256))


def _strides5(imgs: torch.Tensor) -> tuple[int, ...]:
    """Strides of an image batch seen as [N, C, T, H, W]."""
    if imgs.dim() == 4:
        return (imgs.stride(0), imgs.stride(1), 0, imgs.stride(2), imgs.stride(3))
    return tuple(imgs.stride())


def launch_pixel_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    ids: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    inv_denom: torch.Tensor,
    partials: torch.Tensor,
    grad: Optional[torch.Tensor],
    patch_size: int,
    tubelet_size: int,
    norm: int,
    l1: bool,
    eps: float,
    stats: Optional[torch.Tensor] = None,
) -> None:
    """Fill ``partials`` [N*R] with each row's weighted error sum and ``grad`` [N,R,P] (if given, may be ``pred``
    itself) with d(loss)/d(pred), where loss = partials.sum() * inv_denom.

    pred [N,R,P], imgs [N,C,H,W] or [N,C,T,H,W], ids [N,R] int64 or None (row r is patch r), mask [N,L] weights
    or None (all 1), stats [2,C] fp32 mean/std to un-normalise the images with, or None.
    """
    N, R, P = pred.shape
    C = imgs.shape[1]
    PT, PS = tubelet_size, patch_size
    GH, GW = imgs.shape[-2] // PS, imgs.shape[-1] // PS
    block_s, block_c, warps = _tile(C, PT * PS * PS)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    if grad is not None:
        assert grad.stride(2) == 1 and grad.shape == pred.shape
    dummy = partials
    pixel_loss_kernel[(N * R,)](
        pred, grad if grad is not None else dummy, imgs,
        ids if ids is not None else dummy, mask if mask is not None else dummy,
        stats if stats is not None else dummy, inv_denom, partials,
        R, GH, GW,
        *pred.stride(),
        *(grad.stride()[:2] if grad is not None else (0, 0)),
        *_strides5(imgs),
        *(ids.stride() if ids is not None else (0, 0)),
        *(mask.stride() if mask is not None else (0, 0)),
        eps,
        C=C, PT=PT, PS=PS, BLOCK_S=block_s, BLOCK_C=block_c,
        NORM=norm, L1=l1, UNNORM=stats is not None,
        HAS_IDS=ids is not None, HAS_MASK=mask is not None, COMPUTE_GRAD=grad is not None,
        num_warps=warps,
    )


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
