"""Multi-head self-attention holding the qkv / proj parameters of a ViT block.

Two formulations with the same numbers: the reference (``fused=False``) writes softmax(q k^T * scale) v in
plain PyTorch, as the published MAE / VideoMAE code does; the fused one (``fused=True``) hands q, k, v in the
[N, S, H, d] layout (or packed [T, H, d] with ``cu_seqlens``) to :func:`mimfast.ops.visible_attention`, whose
backend is chosen by the dispatcher (``mimfast.backend.use`` / ``MIMFAST_BACKEND``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mimfast.ops.visible_attention import visible_attention

__all__ = ["Attention", "attention_ref"]


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v on [N, S, H, d] (or packed [T, H, d] with ``cu_seqlens`` [N+1]); same layout out.

    Packed sequences attend only within their own segment (a block-diagonal mask), so the reference needs
    neither a loop nor a host synchronisation.
    """
    if cu_seqlens is None:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [N, H, S, d]
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        return (attn @ v).transpose(1, 2)
    T = q.shape[0]
    positions = torch.arange(T, device=q.device, dtype=cu_seqlens.dtype)
    segment = torch.searchsorted(cu_seqlens, positions, right=True)
    same_segment = segment[:, None] == segment[None, :]
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H, T, d]
    scores = (q @ k.transpose(-2, -1)) * scale
    attn = scores.masked_fill(~same_segment, float("-inf")).softmax(dim=-1)
    # rows past cu_seqlens[-1] belong to no sequence: zeros, as visible_attention defines them
    tail = segment > cu_seqlens.numel() - 1
    return (attn @ v).masked_fill(tail[None, :, None], 0.0).transpose(0, 1)


class Attention(nn.Module):
    """Multi-head self-attention: [N, S, D] -> [N, S, D], or packed [T, D] -> [T, D] with ``cu_seqlens``.

    ``qkv`` is ``nn.Linear(dim, 3 * dim)`` with rows q, then k, then v (the timm / official MAE layout); with
    ``qv_bias=True`` it has no bias and separate ``q_bias`` / ``v_bias`` parameters are added (k has none), the
    BEiT / VideoMAE layout. ``proj`` is ``nn.Linear(dim, dim)``.

    Equivalent PyTorch (dense, reference)::

        q, k, v = qkv(x).reshape(N, S, 3, H, d).permute(2, 0, 3, 1, 4)
        x = proj((((q @ k.transpose(-2, -1)) * d ** -0.5).softmax(-1) @ v).transpose(1, 2).reshape(N, S, D))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qv_bias: bool = False,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if qkv_bias and qv_bias:
            raise ValueError("choose one bias layout: qkv_bias (one qkv bias) or qv_bias (separate q and v biases)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def qkv_projection(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., 3D] (q, k, v concatenated)."""
        if self.q_bias is None:
            return self.qkv(x)
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        return F.linear(x, self.qkv.weight, bias)

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        packed = cu_seqlens is not None
        if x.dim() != (2 if packed else 3):
            layout = "[T, D] with cu_seqlens" if packed else "[N, S, D]"
            raise ValueError(f"attention input must be {layout}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        qkv = self.qkv_projection(x).view(*lead, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(-3)  # each [N, S, H, d] or [T, H, d], views into qkv
        if self.fused:
            if packed:
                out = visible_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            else:
                out = visible_attention(q, k, v)
        else:
            out = attention_ref(q, k, v, self.scale, cu_seqlens)
        return self.proj(out.reshape(*lead, self.num_heads * self.head_dim))  # (a -1 fails on zero tokens)
