"""Masked-image-modeling models: MAE, SimMIM and VideoMAE, each returning :class:`MIMOutput`."""

from mimfast.models.mae import (
    MaskedAutoencoderViT,
    mae_vit_base_patch14,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_huge_patch16,
    mae_vit_large_patch14,
    mae_vit_large_patch16,
    mae_vit_small_patch14,
    mae_vit_small_patch16,
    mae_vit_tiny_patch14,
    mae_vit_tiny_patch16,
)
from mimfast.models.simmim import SimMIMViT, simmim_vit_base_patch16, simmim_vit_small_patch16, simmim_vit_tiny_patch16
from mimfast.models.videomae import (
    VideoMAE,
    videomae_vit_base_patch16,
    videomae_vit_large_patch16,
    videomae_vit_small_patch16,
)
from mimfast.models.vit import MIMModel, MIMOutput

__all__ = [
    "MIMModel",
    "MIMOutput",
    "MaskedAutoencoderViT",
    "SimMIMViT",
    "VideoMAE",
    "mae_vit_base_patch14",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_huge_patch16",
    "mae_vit_large_patch14",
    "mae_vit_large_patch16",
    "mae_vit_small_patch14",
    "mae_vit_small_patch16",
    "mae_vit_tiny_patch14",
    "mae_vit_tiny_patch16",
    "simmim_vit_base_patch16",
    "simmim_vit_small_patch16",
    "simmim_vit_tiny_patch16",
    "videomae_vit_base_patch16",
    "videomae_vit_large_patch16",
    "videomae_vit_small_patch16",
]
