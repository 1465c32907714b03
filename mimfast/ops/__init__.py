"""Fused ops with a pure-PyTorch reference beside each (see ``mimfast.backend`` for dispatch)."""

from mimfast.ops.patchify import patchify, unpatchify
from mimfast.ops.random_masking import MaskInfo, random_masking, random_masking_ref

__all__ = ["MaskInfo", "patchify", "random_masking", "random_masking_ref", "unpatchify"]
