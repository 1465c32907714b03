"""Pre-norm transformer block of a ViT: x + attn(norm1(x)), then x + mlp(norm2(x))."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mimfast.nn.attention import Attention

__all__ = ["Block", "Mlp"]


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2: [..., in_features] -> [..., out_features] (timm's ``Mlp`` layout)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """ViT block with keys ``norm1, attn.{qkv,proj}, norm2, mlp.{fc1,fc2}`` (timm / official MAE layout).

    LayerNorms use ``norm_eps`` (1e-6, as every masked-image-modeling ViT does); ``qkv_bias`` / ``qv_bias``
    choose the attention bias layout (see :class:`~mimfast.nn.attention.Attention`). Input [N, S, D], or packed
    [T, D] with ``cu_seqlens`` [N+1] int32 and ``max_seqlen``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qv_bias: bool = False,
        norm_eps: float = 1e-6,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qv_bias=qv_bias, fused=fused)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return x + self.mlp(self.norm2(x))
