"""Pre-norm transformer block of a ViT: x + attn(norm1(x)), then x + mlp(norm2(x))."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mimfast.nn.attention import Attention

__all__ = ["Block", "Mlp", "drop_path"]


def drop_path(x: torch.Tensor, rate: float, u: torch.Tensor) -> torch.Tensor:
    """Stochastic depth of a residual branch (timm's ``drop_path``): sample n's branch output ``x[n]`` is kept,
    divided by 1 - rate, when its uniform ``u[n]`` in [0, 1) is >= rate, and zeroed otherwise."""
    # the decision in the noise's precision (fp32): in bf16, keep + u would round up to 1 and keep too often
    kept = (u >= rate).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    return x.div(1.0 - rate) * kept


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

    ``drop_path`` > 0: in training, each residual branch of each sample is dropped with that probability
    (stochastic depth, as SimMIM's ViT trains), the draws from ``drop_noise`` [N, 2] (uniform in [0, 1): the
    attention branch's, then the MLP's) when given, else from torch's generator. Dense input only.
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
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.drop_path = float(drop_path)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qv_bias=qv_bias, fused=fused)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        drop_noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if not (self.training and self.drop_path > 0):
            x = x + self.attn(self.norm1(x), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            return x + self.mlp(self.norm2(x))
        if cu_seqlens is not None:
            raise ValueError("drop_path needs dense [N, S, D] input, not packed sequences")
        u = drop_noise if drop_noise is not None else torch.rand(x.shape[0], 2, device=x.device)
        if tuple(u.shape) != (x.shape[0], 2):
            raise ValueError(f"drop_noise must be [N, 2] = [{x.shape[0]}, 2], got {tuple(u.shape)}")
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, u[:, 0])
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, u[:, 1])
