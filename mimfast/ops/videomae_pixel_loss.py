"""VideoMAE pixel reconstruction loss: MSE between the predicted masked cubes and the cubes of the un-normalised
video, each cube normalised per channel.

The Triton path is the fused ``mimfast::pixel_loss`` op of :mod:`mimfast.ops.masked_pixel_loss` with the
per-channel normalisation and the un-normalisation done in registers.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from mimfast.backend import get_op
from mimfast.ops.masked_pixel_loss import NORM_CHANNEL, NORM_NONE, pixel_loss, pixel_loss_triton_reasons
from mimfast.ops.patchify import as_size, check_images, grid_size, patch_dim, patchify
from mimfast.ops.random_masking import host_checks

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "videomae_pixel_loss", "videomae_pixel_loss_ref"]

# The ImageNet statistics every data pipeline here normalises with (RGB, images in [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# VideoMAE's fixed epsilon, added to the standard deviation (not to the variance).
STD_EPS = 1e-6


def _check_args(pred: torch.Tensor, videos: torch.Tensor, mask: torch.Tensor, patch_size: int, tubelet_size: int,
                mean: Sequence[float], std: Sequence[float]) -> None:
    check_images(videos, patch_size, tubelet_size, name="videos")
    N, C = videos.shape[:2]
    L = math.prod(grid_size(videos.shape, patch_size, tubelet_size))
    P = patch_dim(C, patch_size, tubelet_size)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (N, L):
        raise ValueError(f"mask must be a [N, L] = [{N}, {L}] tensor, got {getattr(mask, 'shape', type(mask))}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = masked), got {mask.dtype}")
    if not isinstance(pred, torch.Tensor) or pred.dim() != 3 or not pred.is_floating_point():
        raise ValueError(f"pred must be a floating [N, L_masked, P] tensor, got {getattr(pred, 'shape', type(pred))}")
    if pred.shape[0] != N or pred.shape[2] != P or pred.shape[1] > L:
        raise ValueError(f"pred {tuple(pred.shape)} does not match videos {tuple(videos.shape)}: expected "
                         f"[{N}, L_masked <= {L}, {P}]")
    if len(mean) != C or len(std) != C:
        raise ValueError(f"mean and std need {C} values each, got {len(mean)} and {len(std)}")
    if host_checks(mask):
        # the count rule needs the mask's values: checked where reading them costs no device synchronisation
        counts = mask.sum(1)
        if bool((counts != pred.shape[1]).any()):
            raise ValueError(f"every sample must mask as many tokens as pred has rows ({pred.shape[1]}); the mask "
                             f"masks {counts.tolist()}")


def videomae_pixel_loss_ref(
    pred: torch.Tensor,
    videos: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    tubelet_size: int,
    *,
    norm_target: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    upcast: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`videomae_pixel_loss` (differentiable in pred and videos).

    ``upcast`` computes in fp32 when the inputs are half precision. Equivalent PyTorch::

        x = videos * std[:, None, None, None] + mean[:, None, None, None]     # un-normalise, per channel
        cubes = patchify(x, p, p_t).reshape(N, L, p_t * p * p, C)
        if norm_target:
            cubes = (cubes - cubes.mean(-2, keepdim=True)) / (cubes.var(-2, keepdim=True).sqrt() + 1e-6)
        labels = cubes.reshape(N, L, P)[mask].reshape(N, -1, P)
        loss = F.mse_loss(pred, labels)                 # except 0 when no token is masked (mse_loss: NaN)
    """
    if upcast:
        pred, videos = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in (pred, videos))
    N, C = videos.shape[:2]
    m = torch.tensor(mean, dtype=videos.dtype, device=videos.device).view(1, C, 1, 1, 1)
    s = torch.tensor(std, dtype=videos.dtype, device=videos.device).view(1, C, 1, 1, 1)
    cubes = patchify(videos * s + m, patch_size, tubelet_size)
    L, P = cubes.shape[1:]
    if norm_target:
        cubes = cubes.reshape(N, L, -1, C)
        cubes = (cubes - cubes.mean(-2, keepdim=True)) / (cubes.var(-2, keepdim=True).sqrt() + STD_EPS)
        cubes = cubes.reshape(N, L, P)
    if torch.compiler.is_compiling():
        # the boolean selection has a data-dependent size, which a compiled graph cannot hold: gather the
        # pred.shape[1] masked tokens of each sample instead (the same rows, in the same order), NaN when a sample
        # masks another count (where the selection's reshape fails)
        R = pred.shape[1]
        labels = torch.gather(cubes, 1, masked_ids(mask, R)[..., None].expand(-1, -1, P))
        loss = _mse(pred, labels)
        return torch.where((mask.sum(1) == R).all(), loss, torch.full_like(loss, float("nan")))
    return _mse(pred, cubes[mask].reshape(N, -1, P))


def _mse(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # one dtype for both sides: mixed-dtype mse_loss has no CUDA backward (autocast runs it in fp32 anyway)
    dtype = torch.promote_types(pred.dtype, labels.dtype)
    if pred.numel() == 0:
        # no masked token: 0 with a zero gradient, as masked_pixel_loss (mse_loss's mean of no value is NaN)
        return pred.to(dtype).sum()
    return F.mse_loss(pred.to(dtype), labels.to(dtype))


def masked_ids(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """[N, L] bool -> [N, rows] int64 indices of the first ``rows`` masked tokens of each sample, ascending,
    without a host synchronisation (a stable sort puts the masked tokens first, in token order)."""
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :rows]


def _videomae_triton(pred, videos, mask, patch_size, tubelet_size, *, norm_target=True, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD) -> torch.Tensor:
    R = pred.shape[1]
    stats = [float(v) for v in mean] + [float(v) for v in std]
    norm = NORM_CHANNEL if norm_target else NORM_NONE
    # Checking that every sample masks exactly R tokens would need a host sync; a mismatch turns the loss to NaN.
    if torch.compiler.is_compiling():
        loss = pixel_loss(pred, videos, None, masked_ids(mask, R), patch_size, tubelet_size, norm, False, STD_EPS,
                          stats)
        return torch.where((mask.sum(1) == R).all(), loss, torch.full_like(loss, float("nan")))
    from mimfast.kernels.pixel_loss import launch_masked_ids

    # one launch lists the masked tokens and flags the samples with another count, instead of a sort
    ids, bad = launch_masked_ids(mask, R)
    return pixel_loss(pred, videos, None, ids, patch_size, tubelet_size, norm, False, STD_EPS, stats, bad)


def _videomae_reasons(pred, videos, mask, patch_size, tubelet_size, **_: Any) -> list[str]:
    return pixel_loss_triton_reasons(pred, videos, mask, patch_size, tubelet_size)


_op = get_op("videomae_pixel_loss")
_op.register("torch")(videomae_pixel_loss_ref)
_op.register("triton", reasons=_videomae_reasons)(_videomae_triton)


def videomae_pixel_loss(
    pred: torch.Tensor,
    videos: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    tubelet_size: int,
    *,
    norm_target: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """VideoMAE reconstruction loss, a scalar.

    pred: [N, L_masked, P] predictions of the masked tokens in token order (t, h, w), P = p_t*p*p*C.
    videos: [N, C, T, H, W] normalised with ``mean``/``std`` (per channel). mask: [N, L] bool, True = masked,
    the same count L_masked in every sample, equal to pred's rows: a CPU mask that breaks the rule raises a
    ValueError; on a device the reference fails in its reshape, and the triton backend, to stay free of host
    synchronisations, returns NaN.

    The videos are un-normalised (x * std + mean), cut into cubes with values (t, row, col, channel); with
    ``norm_target`` each cube is normalised per channel over its p_t*p*p values, (x - mean) / (std_unbiased +
    1e-6); loss = MSE over every value of the masked cubes, 0 when no token is masked (as
    :func:`~mimfast.ops.masked_pixel_loss`; the published ``F.mse_loss`` gives NaN there). Equivalent PyTorch: see
    :func:`videomae_pixel_loss_ref`. The triton backend treats ``videos`` as a constant.
    """
    patch_size, tubelet_size = as_size(patch_size), as_size(tubelet_size)
    _check_args(pred, videos, mask, patch_size, tubelet_size, mean, std)
    return _op(pred, videos, mask, patch_size, tubelet_size, norm_target=norm_target, mean=mean, std=std,
               backend=backend)
