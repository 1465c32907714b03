"""Loss modules: hold the configuration of a masked reconstruction loss and call its fused op."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from mimfast.ops.masked_pixel_loss import LOSS_KINDS, masked_pixel_loss
from mimfast.ops.simmim_pixel_loss import simmim_pixel_loss
from mimfast.ops.videomae_pixel_loss import IMAGENET_MEAN, IMAGENET_STD, videomae_pixel_loss

__all__ = ["MaskedPixelLoss", "SimMIMPixelLoss", "VideoMAEPixelLoss"]


class MaskedPixelLoss(nn.Module):
    """MAE loss as a module: ``forward(pred, imgs, mask, ids_masked=None)`` -> scalar, see
    :func:`mimfast.ops.masked_pixel_loss` (pred [N, L, P] or masked rows [N, L-K, P] with ``ids_masked``)."""

    def __init__(self, patch_size: int, norm_pix: bool = False, kind: str = "mse", eps: float = 1e-6,
                 tubelet_size: Optional[int] = None) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
        self.patch_size = patch_size
        self.norm_pix = norm_pix
        self.kind = kind
        self.eps = eps
        self.tubelet_size = tubelet_size

    def forward(self, pred: torch.Tensor, imgs: torch.Tensor, mask: Optional[torch.Tensor],
                ids_masked: Optional[torch.Tensor] = None) -> torch.Tensor:
        return masked_pixel_loss(pred, imgs, mask, self.patch_size, norm_pix=self.norm_pix, kind=self.kind,
                                 eps=self.eps, ids_masked=ids_masked, tubelet_size=self.tubelet_size)


class VideoMAEPixelLoss(nn.Module):
    """VideoMAE loss as a module: ``forward(pred, videos, mask)`` -> scalar, see
    :func:`mimfast.ops.videomae_pixel_loss` (pred [N, L_masked, P], mask bool [N, L]; ``mean`` / ``std``: the
    per-channel statistics the videos were normalised with)."""

    def __init__(self, patch_size: int, tubelet_size: int, norm_target: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.norm_target = norm_target
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, pred: torch.Tensor, videos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return videomae_pixel_loss(pred, videos, mask, self.patch_size, self.tubelet_size,
                                   norm_target=self.norm_target, mean=self.mean, std=self.std)


class SimMIMPixelLoss(nn.Module):
    """SimMIM loss as a module: ``forward(pred_imgs, imgs, mask)`` -> scalar, see
    :func:`mimfast.ops.simmim_pixel_loss` (pred_imgs [N, C, H, W], mask [N, L])."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, pred_imgs: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return simmim_pixel_loss(pred_imgs, imgs, mask, self.patch_size)
