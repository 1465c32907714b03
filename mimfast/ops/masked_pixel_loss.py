"""MAE pixel reconstruction loss: per-patch error against the (optionally normalised) image patches, averaged
over the masked patches.

The Triton path computes the target straight from the image inside the kernel (no patchified copy) and writes
the gradient for ``pred`` during the forward pass; the backward pass only scales it by the incoming gradient.
The custom op ``mimfast::pixel_loss`` defined here is shared with :mod:`mimfast.ops.videomae_pixel_loss`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from mimfast.backend import first_order_only, get_op
from mimfast.ops.gather_patches import check_index
from mimfast.ops.patchify import as_size, check_images, grid_size, patch_dim, patchify, span_reasons

__all__ = ["masked_pixel_loss", "masked_pixel_loss_ref", "LOSS_KINDS"]

LOSS_KINDS = ("mse", "l1")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# target normalisation codes of the kernel (mimfast.kernels.pixel_loss, imported on first launch only)
NORM_NONE, NORM_PATCH, NORM_CHANNEL = 0, 1, 2
# the kernel holds a whole patch in registers; past this many (padded) values it would spill
MAX_TILE = 8192


def _check_mask(mask: torch.Tensor, N: int, L: int, name: str = "mask") -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != (N, L):
        raise ValueError(f"{name} must have shape [N, L] = [{N}, {L}], got {tuple(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool, integer or floating (1 = masked), got {mask.dtype}")


def as_weights(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An integer 0/1 mask (as a default collate of a mask generator's arrays gives) as float32 weights; bool and
    floating masks as they are."""
    if mask is None or mask.dtype == torch.bool or mask.is_floating_point():
        return mask
    return mask.to(torch.float32)


def check_pixel_loss_args(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: Optional[torch.Tensor],
    patch_size: int,
    ids_masked: Optional[torch.Tensor],
    tubelet_size: Optional[int],
    kind: str = "mse",
    eps: float = 0.0,
) -> None:
    """Raise a clear error unless the arguments describe a valid masked pixel loss call."""
    check_images(imgs, patch_size, tubelet_size)
    N, C = imgs.shape[:2]
    L = math.prod(grid_size(imgs.shape, patch_size, tubelet_size))
    P = patch_dim(C, patch_size, tubelet_size)
    if not isinstance(pred, torch.Tensor) or pred.dim() != 3 or not pred.is_floating_point():
        raise ValueError(f"pred must be a floating [N, L, P] tensor, got {getattr(pred, 'shape', type(pred))}")
    if pred.shape[0] != N or pred.shape[2] != P:
        raise ValueError(f"pred {tuple(pred.shape)} does not match images {tuple(imgs.shape)}: "
                         f"expected [{N}, rows, {P}]")
    if ids_masked is None:
        if pred.shape[1] != L:
            raise ValueError(f"pred has {pred.shape[1]} rows but the images have {L} patches; pass ids_masked "
                             "when pred holds only the masked rows")
        if mask is None:
            raise ValueError("mask is required unless ids_masked is given")
    else:
        if not isinstance(ids_masked, torch.Tensor) or ids_masked.dtype not in (torch.int64, torch.int32):
            raise TypeError("ids_masked must be an int64 (or int32) tensor")
        if tuple(ids_masked.shape) != tuple(pred.shape[:2]):
            raise ValueError(f"ids_masked must have shape [N, rows of pred] = {tuple(pred.shape[:2])}, "
                             f"got {tuple(ids_masked.shape)}")
        check_index(ids_masked, N, L, imgs.device, "ids_masked", (torch.int64, torch.int32))
    if mask is not None:
        _check_mask(mask, N, L)
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def masked_pixel_loss_ref(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: Optional[torch.Tensor],
    patch_size: int,
    *,
    norm_pix: bool = False,
    kind: str = "mse",
    eps: float = 1e-6,
    ids_masked: Optional[torch.Tensor] = None,
    tubelet_size: Optional[int] = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`masked_pixel_loss` (differentiable in every floating input).

    ``upcast`` computes in fp32 when the inputs are half precision; without it the per-patch losses are in the
    inputs' dtype and the sums over patches accumulate in float32. Equivalent PyTorch (pred holding all rows)::

        target = patchify(imgs, p)                                   # [N, L, P]
        if norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + eps) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)                       # [N, L]; kind "l1": .abs()
        loss = (loss * mask).sum() / mask.sum()                      # 0 when no patch is masked
    """
    target = patchify(imgs, patch_size, tubelet_size)
    if upcast:
        pred, target = _upcast(pred), _upcast(target)
    weights = mask
    if ids_masked is not None:
        target = target.gather(1, ids_masked.long()[..., None].expand(-1, -1, target.shape[-1]))
        weights = None if mask is None else mask.gather(1, ids_masked.long())
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    diff = pred - target
    loss = (diff * diff if kind == "mse" else diff.abs()).mean(-1)
    weights = torch.ones_like(loss) if weights is None else weights.to(loss.dtype)
    # the sums over patches in float32 at least (MAE's float32 mask and loss hold them so): in half precision the
    # count of masked patches rounds (bf16) or passes 65504 (fp16), as can the sum of their losses
    acc = torch.promote_types(loss.dtype, torch.float32)
    total = weights.sum(dtype=acc)
    # no masked patch: the loss is 0 (and so is every gradient) instead of 0 / 0
    return ((loss * weights).sum(dtype=acc) / torch.where(total == 0, torch.ones_like(total), total)).to(loss.dtype)


_stats_cache: dict[tuple[str, tuple[float, ...]], torch.Tensor] = {}


def _stats_tensor(stats: list[float], device: torch.device) -> torch.Tensor:
    """[2, C] fp32 mean and std on ``device``, built once per (device, values)."""
    key = (str(device), tuple(stats))
    if key not in _stats_cache:
        _stats_cache[key] = torch.tensor(stats, dtype=torch.float32, device=device).view(2, -1)
    return _stats_cache[key]


def pixel_loss_forward(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: Optional[torch.Tensor],
    ids: Optional[torch.Tensor],
    patch_size: int,
    tubelet_size: int,
    norm: int,
    l1: bool,
    eps: float,
    stats: Optional[torch.Tensor],
    compute_grad: bool,
    bad: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(loss, d loss / d pred or None) with loss = sum_rows w * sum_P err / (P * sum_rows w): at most three launches
    (row-weight sums, the fused loss kernel, the final sum). ``bad``: int32 flags turning the loss to NaN."""
    from mimfast.kernels.pixel_loss import launch_loss_finalize, launch_pixel_loss, launch_weight_sums, num_partials

    N, R, P = pred.shape
    wparts = None if mask is None else launch_weight_sums(mask, ids, R)
    partials = torch.empty(num_partials(N * R, P, norm), dtype=torch.float32, device=pred.device)
    grad = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device) if compute_grad else None
    if N * R > 0:
        launch_pixel_loss(pred, imgs, ids, mask, wparts, N * R, partials, grad, patch_size, tubelet_size, norm, l1,
                          eps, stats)
    loss = launch_loss_finalize(partials, wparts, N * R, P, torch.promote_types(pred.dtype, imgs.dtype), bad)
    return loss, grad


def scale_saved_grad(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad * grad_loss for a gradient the forward pass stored: in place when this backward is the graph's last
    (nothing moves when grad_loss is exactly 1, the usual case), out of place when the graph is kept for another
    backward (retain_graph=True) and the stored gradient must stay as it is."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if (keep_graph is None or torch.compiler.is_compiling() or keep_graph() or not grad.is_contiguous()
            or grad.numel() == 0):
        return grad * grad_loss
    from mimfast.kernels.pixel_loss import launch_scale_

    return launch_scale_(grad, grad_loss)


class _PixelLoss(torch.autograd.Function):
    """Eager autograd for the fused loss: calling the custom op through the dispatcher costs tens of microseconds
    per call on the host, as much as the kernels take on the device, so eager calls come here and only
    ``torch.compile`` goes through ``mimfast::pixel_loss``."""

    @staticmethod
    def forward(ctx: Any, pred: torch.Tensor, imgs: torch.Tensor, mask: Optional[torch.Tensor],
                ids: Optional[torch.Tensor], patch_size: int, tubelet_size: int, norm: int, l1: bool, eps: float,
                stats: Optional[torch.Tensor], bad: Optional[torch.Tensor]) -> torch.Tensor:
        loss, grad = pixel_loss_forward(pred, imgs, mask, ids, patch_size, tubelet_size, norm, l1, eps, stats, True,
                                        bad)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return (scale_saved_grad(grad, grad_loss),) + (None,) * 10


def pixel_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: Optional[torch.Tensor], ids: Optional[torch.Tensor],
               patch_size: int, tubelet_size: int, norm: int, l1: bool, eps: float,
               stats: Optional[list[float]] = None, bad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused loss, differentiable in ``pred``: the custom op under ``torch.compile``, else a direct autograd
    Function (no ``bad`` flags under compile: the caller handles them there)."""
    compute_grad = torch.is_grad_enabled() and pred.requires_grad
    if torch.compiler.is_compiling():
        return pixel_loss_op(pred, imgs, mask, ids, patch_size, tubelet_size, norm, l1, eps, stats, compute_grad)[0]
    stats_t = None if stats is None else _stats_tensor(stats, pred.device)
    if compute_grad:
        return _PixelLoss.apply(pred, imgs, mask, ids, patch_size, tubelet_size, norm, l1, eps, stats_t, bad)
    return pixel_loss_forward(pred, imgs, mask, ids, patch_size, tubelet_size, norm, l1, eps, stats_t, False, bad)[0]


@torch.library.custom_op("mimfast::pixel_loss", mutates_args=())
def pixel_loss_op(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: Optional[torch.Tensor],
    ids: Optional[torch.Tensor],
    patch_size: int,
    tubelet_size: int,
    norm: int,
    l1: bool,
    eps: float,
    stats: Optional[list[float]],
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused loss and gradient: (loss, d loss / d pred) with loss = sum_rows w * sum_P err / (P * sum_rows w).

    pred [N,R,P], imgs [N,C,H,W] or [N,C,T,H,W], mask [N,L] weights or None (all rows weigh 1), ids [N,R] patch
    index of each pred row or None (R = L), stats: per-channel mean then std to un-normalise the images with.
    Without ``compute_grad`` the second output is empty.
    """
    stats_t = None if stats is None else _stats_tensor(stats, pred.device)
    loss, grad = pixel_loss_forward(pred, imgs, mask, ids, patch_size, tubelet_size, norm, l1, eps, stats_t,
                                    compute_grad)
    return loss, grad if grad is not None else pred.new_empty((0,))


@pixel_loss_op.register_fake
def _pixel_loss_fake(pred, imgs, mask, ids, patch_size, tubelet_size, norm, l1, eps, stats, compute_grad):
    loss = pred.new_empty((), dtype=torch.promote_types(pred.dtype, imgs.dtype))
    grad = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device) if compute_grad else pred.new_empty((0,))
    return loss, grad


def _pixel_loss_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(output[1])


def _pixel_loss_backward(ctx: Any, grad_loss: torch.Tensor, _grad_of_grad: Any) -> tuple:
    # out of place: under torch.compile the multiplication fuses into the consumer of the gradient
    (grad,) = ctx.saved_tensors
    return (grad * grad_loss,) + (None,) * 10


pixel_loss_op.register_autograd(_pixel_loss_backward, setup_context=_pixel_loss_setup)


def pixel_loss_triton_reasons(pred: torch.Tensor, imgs: torch.Tensor, mask: Optional[torch.Tensor],
                              patch_size: int, tubelet_size: Optional[int]) -> list[str]:
    """Why the fused kernel cannot run a call (shared by the MAE and VideoMAE losses)."""
    reasons = []
    if pred.dtype not in KERNEL_DTYPES:
        reasons.append(f"pred dtype {pred.dtype} is not one of fp16/bf16/fp32 (use backend='torch')")
    if imgs.dtype not in KERNEL_DTYPES:
        reasons.append(f"images dtype {imgs.dtype} is not one of fp16/bf16/fp32 (use backend='torch')")
    if imgs.requires_grad or (mask is not None and mask.requires_grad):
        reasons.append("the fused loss treats images and mask as constants, but one of them requires grad")
    tile = 1 << max(0, (patch_dim(1, patch_size, tubelet_size) - 1).bit_length())
    tile *= 1 << max(0, (imgs.shape[1] - 1).bit_length())
    if tile > MAX_TILE:
        reasons.append(f"a patch of {patch_dim(imgs.shape[1], patch_size, tubelet_size)} values does not fit "
                       f"the kernel's register tile (at most {MAX_TILE} padded values)")
    reasons += span_reasons({"images": imgs}, patch_size, tubelet_size)
    if pred.dim() == 3 and (pred.shape[2] - 1) * abs(pred.stride(2)) >= 2**31:
        reasons.append("pred's rows span offsets past int32 (a strided view): pass a contiguous pred")
    return reasons


def _masked_pixel_loss_triton(pred, imgs, mask, patch_size, *, norm_pix=False, kind="mse", eps=1e-6,
                              ids_masked=None, tubelet_size=None) -> torch.Tensor:
    return pixel_loss(pred, imgs, mask, ids_masked, patch_size, tubelet_size or 1,
                      NORM_PATCH if norm_pix else NORM_NONE, kind == "l1", float(eps))


def _masked_pixel_loss_reasons(pred, imgs, mask, patch_size, *, tubelet_size=None, **_: Any) -> list[str]:
    return pixel_loss_triton_reasons(pred, imgs, mask, patch_size, tubelet_size)


_op = get_op("masked_pixel_loss")
_op.register("torch")(masked_pixel_loss_ref)
_op.register("triton", reasons=_masked_pixel_loss_reasons)(_masked_pixel_loss_triton)


def masked_pixel_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: Optional[torch.Tensor],
    patch_size: int,
    *,
    norm_pix: bool = False,
    kind: str = "mse",
    eps: float = 1e-6,
    ids_masked: Optional[torch.Tensor] = None,
    tubelet_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """MAE reconstruction loss, a scalar.

    pred: [N, L, P] predictions for every patch, or [N, R, P] for the patches listed in ``ids_masked`` [N, R]
    (typically the R = L - K masked ones, in the order the decoder emits them). imgs: [N, C, H, W] (or
    [N, C, T, H, W] with ``tubelet_size``), P = p*p*C (p_t*p*p*C). mask: [N, L] bool, integer or floating,
    1 (True) = masked, weights the per-patch losses; with ``ids_masked`` it may be None (every listed row weighs 1).

    target = patchify(imgs); with ``norm_pix`` each target patch is normalised by its own mean and unbiased
    variance: (t - mean) / sqrt(var + eps). Per patch: mean over P of (pred - target)^2 (``kind="l1"``:
    |pred - target|); loss = sum(loss * mask) / sum(mask). When no patch is masked (sum(mask) == 0) the loss is 0
    and so are its gradients, instead of NaN. ``ids_masked`` values must lie in [0, L): checked at once on CPU,
    by an asynchronous device assert on CUDA (skipped for indices straight from :func:`masked_ids_from_restore`).

    Equivalent PyTorch: see :func:`masked_pixel_loss_ref`. The triton backend treats ``imgs`` and ``mask`` as
    constants (no gradient for them), as MAE does. It reads nothing of a row whose weight is 0, so a NaN or inf
    there (in ``pred`` or in the image patch) does not reach its loss, where the reference's ``loss * mask``
    turns it into NaN; a non-finite value in a row that is scored gives the same result on both backends.
    """
    patch_size, tubelet_size = as_size(patch_size), as_size(tubelet_size)
    check_pixel_loss_args(pred, imgs, mask, patch_size, ids_masked, tubelet_size, kind, eps)
    return _op(pred, imgs, as_weights(mask), patch_size, norm_pix=norm_pix, kind=kind, eps=eps, ids_masked=ids_masked,
               tubelet_size=tubelet_size, backend=backend)

