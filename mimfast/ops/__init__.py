"""Fused ops with a pure-PyTorch reference beside each (see ``mimfast.backend`` for dispatch).

Importing this package registers every op's backends; no kernel module (and so no triton) is imported until a
Triton launcher runs.
"""

from mimfast.ops.embed_visible import embed_visible, embed_visible_ref
from mimfast.ops.fused_head_loss import fused_head_masked_pixel_loss, fused_head_masked_pixel_loss_ref
from mimfast.ops.gather_patches import gather_patches, gather_patches_ref
from mimfast.ops.masked_pixel_loss import masked_pixel_loss, masked_pixel_loss_ref
from mimfast.ops.masking import (
    RaggedMaskInfo,
    block_masking,
    importance_masking,
    mask_info_from_mask,
    ragged_random_masking,
    ratio_schedule,
    seeded_noise,
    simmim_masking,
    tube_masking,
)
from mimfast.ops.patchify import patchify, unpatchify
from mimfast.ops.random_masking import MaskInfo, draw_seed, fold_seed, random_masking, random_masking_ref
from mimfast.ops.restore_tokens import restore_tokens, restore_tokens_ref
from mimfast.ops.simmim_pixel_loss import simmim_pixel_loss, simmim_pixel_loss_ref
from mimfast.ops.videomae_pixel_loss import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    videomae_pixel_loss,
    videomae_pixel_loss_ref,
)
from mimfast.ops.visible_attention import visible_attention, visible_attention_ref

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "MaskInfo", "RaggedMaskInfo",
    "block_masking", "draw_seed", "embed_visible", "embed_visible_ref", "fold_seed", "fused_head_masked_pixel_loss",
    "fused_head_masked_pixel_loss_ref", "gather_patches", "gather_patches_ref", "importance_masking",
    "mask_info_from_mask", "masked_pixel_loss", "masked_pixel_loss_ref", "patchify", "ragged_random_masking",
    "random_masking", "random_masking_ref", "ratio_schedule", "restore_tokens", "restore_tokens_ref",
    "seeded_noise", "simmim_masking", "simmim_pixel_loss", "simmim_pixel_loss_ref", "tube_masking", "unpatchify",
    "videomae_pixel_loss", "videomae_pixel_loss_ref", "visible_attention", "visible_attention_ref",
]
