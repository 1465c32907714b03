"""Fused ops with a pure-PyTorch reference beside each (see ``mimfast.backend`` for dispatch)."""

from mimfast.ops.patchify import patchify, unpatchify
from mimfast.ops.random_masking import MaskInfo, random_masking, random_masking_ref

__all__ = ["MaskInfo", "patchify", "random_masking", "random_masking_ref", "unpatchify"]

from mimfast.ops.masked_pixel_loss import masked_pixel_loss, masked_pixel_loss_ref  # noqa: E402
from mimfast.ops.simmim_pixel_loss import simmim_pixel_loss, simmim_pixel_loss_ref  # noqa: E402
from mimfast.ops.videomae_pixel_loss import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    videomae_pixel_loss,
    videomae_pixel_loss_ref,
)

__all__ += ["IMAGENET_MEAN", "IMAGENET_STD", "masked_pixel_loss", "masked_pixel_loss_ref", "simmim_pixel_loss",
            "simmim_pixel_loss_ref", "videomae_pixel_loss", "videomae_pixel_loss_ref"]

from mimfast.ops.embed_visible import embed_visible, embed_visible_ref  # noqa: E402
from mimfast.ops.gather_patches import gather_patches, gather_patches_ref  # noqa: E402
from mimfast.ops.restore_tokens import restore_tokens, restore_tokens_ref  # noqa: E402

__all__ += ["embed_visible", "embed_visible_ref", "gather_patches", "gather_patches_ref", "restore_tokens",
            "restore_tokens_ref"]

from mimfast.ops.masking import (  # noqa: E402
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
from mimfast.ops.random_masking import draw_seed, fold_seed  # noqa: E402

__all__ += ["RaggedMaskInfo", "block_masking", "draw_seed", "fold_seed", "importance_masking", "mask_info_from_mask",
            "ragged_random_masking", "ratio_schedule", "seeded_noise", "simmim_masking", "tube_masking"]

from mimfast.ops.visible_attention import visible_attention, visible_attention_ref  # noqa: E402

__all__ += ["visible_attention", "visible_attention_ref"]

from mimfast.ops.fused_head_loss import fused_head_masked_pixel_loss, fused_head_masked_pixel_loss_ref  # noqa: E402

__all__ += ["fused_head_masked_pixel_loss", "fused_head_masked_pixel_loss_ref"]
