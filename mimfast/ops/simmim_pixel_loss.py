"""SimMIM reconstruction loss: L1 between the reconstructed and the input image on the pixels of masked patches.

The Triton path reads the mask at model-patch granularity (no upsampled [N, 1, H, W] mask) and writes the
gradient for the reconstruction during the forward pass.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from mimfast.backend import get_op
from mimfast.ops.masked_pixel_loss import KERNEL_DTYPES, MAX_TILE, as_weights
from mimfast.ops.patchify import as_size, check_images, span_reasons

__all__ = ["simmim_pixel_loss", "simmim_pixel_loss_ref"]

# SimMIM's constant keeping the loss finite when no pixel is masked.
DENOM_EPS = 1e-5


def _check_args(pred_imgs: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int) -> None:
    check_images(imgs, patch_size)
    if not isinstance(pred_imgs, torch.Tensor) or pred_imgs.shape != imgs.shape or not pred_imgs.is_floating_point():
        raise ValueError(f"pred_imgs must be a floating tensor shaped like imgs {tuple(imgs.shape)}, "
                         f"got {getattr(pred_imgs, 'shape', type(pred_imgs))}")
    N, _, H, W = imgs.shape
    h, w = H // patch_size, W // patch_size
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) not in ((N, h * w), (N, h, w)):
        raise ValueError(f"mask must be [N, L] = [{N}, {h * w}] (or [N, h, w] = [{N}, {h}, {w}]) at model-patch "
                         f"granularity, got {getattr(mask, 'shape', type(mask))}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or floating (1 = masked), got {mask.dtype}")


def simmim_pixel_loss_ref(
    pred_imgs: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`simmim_pixel_loss` (differentiable in pred_imgs and imgs).

    ``upcast`` computes in fp32 when the inputs are half precision; without it the per-pixel errors are in the
    inputs' dtype and the two sums accumulate in float32. Equivalent PyTorch::

        m = mask.reshape(N, h, w).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)   # [N, 1, H, W]
        loss = (F.l1_loss(imgs, pred_imgs, reduction="none") * m).sum() / (m.sum() + 1e-5) / C
    """
    if upcast:
        pred_imgs, imgs = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in (pred_imgs, imgs))
    N, C, H, W = imgs.shape
    p = patch_size
    dtype = torch.promote_types(pred_imgs.dtype, imgs.dtype)
    m = mask.reshape(N, H // p, W // p).to(dtype).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
    loss = F.l1_loss(imgs, pred_imgs, reduction="none")
    # the two sums in float32 at least, as SimMIM's float32 loss and integer mask hold them: in half precision the
    # pixel count rounds (bf16) or passes 65504 (fp16: an infinite denominator, a zero loss)
    acc = torch.promote_types(dtype, torch.float32)
    return ((loss * m).sum(dtype=acc) / (m.sum(dtype=acc) + DENOM_EPS) / C).to(dtype)


@torch.library.custom_op("mimfast::simmim_pixel_loss", mutates_args=())
def simmim_pixel_loss_op(pred_imgs: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                         compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused loss and gradient (loss, d loss / d pred_imgs); mask [N, L]. Without ``compute_grad`` the second
    output is empty."""
    from mimfast.kernels.pixel_loss import launch_simmim_loss

    N, C, H, W = imgs.shape
    p = patch_size
    partials = torch.empty(mask.numel(), dtype=torch.float32, device=imgs.device)
    masked_pixels = mask.sum(dtype=torch.float32) * (p * p)
    inv_denom = (1.0 / ((masked_pixels + DENOM_EPS) * C)).reshape(1)
    grad = torch.empty(pred_imgs.shape, dtype=pred_imgs.dtype, device=pred_imgs.device) if compute_grad else None
    if partials.numel() > 0:
        launch_simmim_loss(pred_imgs, imgs, mask, inv_denom, partials, grad, p)
    loss = (partials.sum() * inv_denom[0]).to(torch.promote_types(pred_imgs.dtype, imgs.dtype))
    return loss, grad if grad is not None else pred_imgs.new_empty((0,))


@simmim_pixel_loss_op.register_fake
def _simmim_fake(pred_imgs, imgs, mask, patch_size, compute_grad):
    loss = pred_imgs.new_empty((), dtype=torch.promote_types(pred_imgs.dtype, imgs.dtype))
    grad = (torch.empty(pred_imgs.shape, dtype=pred_imgs.dtype, device=pred_imgs.device) if compute_grad
            else pred_imgs.new_empty((0,)))
    return loss, grad


def _simmim_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(output[1])


def _simmim_backward(ctx: Any, grad_loss: torch.Tensor, _grad_of_grad: Any) -> tuple:
    (grad,) = ctx.saved_tensors
    return grad * grad_loss, None, None, None, None


simmim_pixel_loss_op.register_autograd(_simmim_backward, setup_context=_simmim_setup)


def _simmim_triton(pred_imgs, imgs, mask, patch_size) -> torch.Tensor:
    compute_grad = torch.is_grad_enabled() and pred_imgs.requires_grad
    N, _, H, W = imgs.shape
    flat = mask.reshape(N, (H // patch_size) * (W // patch_size))
    loss, _ = simmim_pixel_loss_op(pred_imgs, imgs, flat, patch_size, compute_grad)
    return loss


def _simmim_reasons(pred_imgs, imgs, mask, patch_size, **_: Any) -> list[str]:
    reasons = []
    for name, t in (("pred_imgs", pred_imgs), ("imgs", imgs)):
        if t.dtype not in KERNEL_DTYPES:
            reasons.append(f"{name} dtype {t.dtype} is not one of fp16/bf16/fp32 (use backend='torch')")
    if imgs.requires_grad or mask.requires_grad:
        reasons.append("the fused loss treats imgs and mask as constants, but one of them requires grad")
    tile = (1 << max(0, (patch_size * patch_size - 1).bit_length())) * (1 << max(0, (imgs.shape[1] - 1).bit_length()))
    if tile > MAX_TILE:
        reasons.append(f"a {patch_size}x{patch_size} patch of {imgs.shape[1]} channels does not fit the kernel's "
                       f"register tile (at most {MAX_TILE} padded values)")
    return reasons + span_reasons({"imgs": imgs, "pred_imgs": pred_imgs}, patch_size)


_op = get_op("simmim_pixel_loss")
_op.register("torch")(simmim_pixel_loss_ref)
_op.register("triton", reasons=_simmim_reasons)(_simmim_triton)


def simmim_pixel_loss(
    pred_imgs: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """SimMIM reconstruction loss, a scalar.

    pred_imgs, imgs: [N, C, H, W]. mask: [N, L] (or [N, h, w]) at model-patch granularity, bool or 0/1 (integer
    or floating), 1 = masked; ``patch_size`` is the model patch size p, L = (H/p) * (W/p). The mask is upsampled
    to pixels: loss = sum(|imgs - pred_imgs| * mask_px) / (sum(mask_px) + 1e-5) / C, with mask_px the [N, 1, H, W] pixel
    mask (one channel), exactly as SimMIM computes it. Equivalent PyTorch: see :func:`simmim_pixel_loss_ref`.
    The triton backend treats ``imgs`` and ``mask`` as constants, and reads no pixel of a patch whose weight is 0:
    a NaN or inf there does not reach its loss, where the reference's ``loss * mask_px`` turns it into NaN.
    """
    patch_size = as_size(patch_size)
    _check_args(pred_imgs, imgs, mask, patch_size)
    return _op(pred_imgs, imgs, as_weights(mask), patch_size, backend=backend)
