"""Pieces shared by the masked-image-modeling ViTs: the output tuple, fixed sin-cos position tables, weight
initialisation, the ``fused`` switch and input checks with clear messages."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from mimfast.nn.attention import Attention
from mimfast.ops.patchify import check_images

__all__ = [
    "MIMModel",
    "MIMOutput",
    "check_model_input",
    "check_noise",
    "clipped_normal_",
    "init_linear_layernorm_",
    "sincos_1d_embed",
    "sincos_2d_pos_embed",
    "sinusoid_table",
]


class MIMOutput(NamedTuple):
    """What every masked-image-modeling model returns; unpacks like the official ``loss, pred, mask = model(x)``.

    loss: scalar reconstruction loss
    pred: the model's reconstruction ([N, L, P] for MAE, [N, L_masked, P] for VideoMAE, [N, C, H, W] for SimMIM)
    mask: [N, L], 1 / True = masked (reconstructed) token
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


def sincos_1d_embed(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim] float64: sin(pos * w_i) in the first half, cos(pos * w_i) in the second,
    with w_i = 10000^(-i / (embed_dim / 2)), i = 0 .. embed_dim/2 - 1 (the MAE table along one axis)."""
    if embed_dim % 2:
        raise ValueError(f"a sin-cos embedding needs an even width, got {embed_dim}")
    half = embed_dim // 2
    omega = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def sincos_2d_pos_embed(embed_dim: int, grid_size: Sequence[int], cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position table [(1 +) h*w, embed_dim] float64 for a (h, w) patch grid, row-major.

    The first half of the channels is the 1-D table of the column index, the second half that of the row index
    (the MAE convention); with ``cls_token`` a zero row comes first.
    """
    if embed_dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    table = torch.cat(
        (sincos_1d_embed(embed_dim // 2, cols.reshape(-1)), sincos_1d_embed(embed_dim // 2, rows.reshape(-1))), dim=1
    )
    if cls_token:
        table = torch.cat((torch.zeros(1, embed_dim, dtype=torch.float64), table), dim=0)
    return table


def sinusoid_table(num_positions: int, embed_dim: int) -> torch.Tensor:
    """Fixed 1-D sinusoid table [num_positions, embed_dim] float64 (the VideoMAE / "Attention is all you need"
    table): angle(pos, j) = pos / 10000^(2 * (j // 2) / embed_dim), sin on even channels j, cos on odd ones."""
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2.0 * torch.div(torch.arange(embed_dim), 2, rounding_mode="floor").to(torch.float64) / embed_dim
    angles = positions / 10000.0**exponent[None, :]
    table = torch.empty(num_positions, embed_dim, dtype=torch.float64)
    table[:, 0::2] = angles[:, 0::2].sin()
    table[:, 1::2] = angles[:, 1::2].cos()
    return table


def clipped_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Normal(0, std) truncated at +-std (not at +-2 in absolute value, torch's default bounds, which leave a
    0.02-wide normal untouched): what SimMIM's ViT and VideoMAE call ``trunc_normal_(t, std=.02)``."""
    return nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)


def init_linear_layernorm_(module: nn.Module, linear: str = "xavier") -> None:
    """Initialise one module in place: Linear weights xavier-uniform (``linear="xavier"``, MAE / VideoMAE) or
    normal(0.02) clipped at +-0.02 (``"trunc_normal"``, SimMIM's ViT), Linear biases 0, LayerNorm weight 1 bias 0.
    Meant for ``model.apply``."""
    if isinstance(module, nn.Linear):
        if linear == "xavier":
            nn.init.xavier_uniform_(module.weight)
        else:
            clipped_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MIMModel(nn.Module):
    """Base of the mimfast models: the ``fused`` switch, shared by every attention module inside.

    ``fused=False`` runs the published formulation in plain PyTorch; ``fused=True`` calls :mod:`mimfast.ops`
    without ``backend=``, so ``mimfast.backend.use(...)`` / ``MIMFAST_BACKEND`` decide (on CPU ``auto`` runs
    each op's torch reference). Both compute the same numbers.
    """

    _fused: bool = True
    # parameters the method's official recipe keeps out of weight decay besides biases and 1-D ones (full names)
    NO_WEIGHT_DECAY: frozenset[str] = frozenset()

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters the official training recipe exempts from weight decay, besides biases and
        1-D parameters (which every recipe exempts): none for MAE, which decays its cls and mask tokens."""
        return set(self.NO_WEIGHT_DECAY)

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused = self._fused
            elif isinstance(module, MIMModel):
                module._fused = self._fused


def check_model_input(
    x: torch.Tensor,
    *,
    name: str,
    img_size: tuple[int, int],
    patch_size: int,
    in_chans: int,
    device: torch.device,
    num_frames: Optional[int] = None,
    tubelet_size: Optional[int] = None,
) -> None:
    """Raise a clear error unless ``x`` is a floating batch the model can take: [N, C, H, W] (or [N, C, T, H, W]
    with ``tubelet_size``) with the model's channels, size and frame count, on the model's device."""
    check_images(x, patch_size, tubelet_size, name=name)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (N = 0)")
    if x.shape[1] != in_chans:
        raise ValueError(f"{name} has {x.shape[1]} channels, the model expects {in_chans}")
    if tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(f"{name} size {x.shape[-2]}x{x.shape[-1]} does not match the model's {img_size[0]}x"
                         f"{img_size[1]}")
    if num_frames is not None and x.shape[2] != num_frames:
        raise ValueError(f"{name} has {x.shape[2]} frames, the model expects {num_frames}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the model is on {device}")


def check_noise(noise: Optional[torch.Tensor], N: int, L: int, device: torch.device) -> None:
    """Raise unless ``noise`` is None or an [N, L] tensor on ``device``."""
    if noise is None:
        return
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a tensor, got {type(noise).__name__}")
    if tuple(noise.shape) != (N, L):
        raise ValueError(f"noise must have shape [N, L] = [{N}, {L}], got {tuple(noise.shape)}")
    if noise.device != device:
        raise ValueError(f"noise is on {noise.device} but the model is on {device}")

