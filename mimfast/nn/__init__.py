"""Thin modules holding parameters (state-dict layout of timm / the official MIM code) and calling mimfast ops."""

from mimfast.nn.attention import Attention, attention_ref
from mimfast.nn.block import Block, Mlp
from mimfast.nn.loss import MaskedPixelLoss, SimMIMPixelLoss, VideoMAEPixelLoss
from mimfast.nn.patch_embed import PatchEmbed, TubeletEmbed

__all__ = ["Attention", "Block", "MaskedPixelLoss", "Mlp", "PatchEmbed", "SimMIMPixelLoss", "TubeletEmbed",
           "VideoMAEPixelLoss", "attention_ref"]
