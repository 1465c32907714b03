"""Patch and tubelet embeddings: a convolution with kernel = stride = patch size, flattened to tokens."""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

__all__ = ["PatchEmbed", "TubeletEmbed", "to_2tuple"]


def to_2tuple(size: Union[int, tuple[int, int]]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def _square(patch_size: Union[int, tuple[int, int]]) -> int:
    """The side of a square patch given as an int or a pair (timm's form); the ops' patch layout is square."""
    height, width = to_2tuple(patch_size)
    if height != width:
        raise ValueError(f"patches must be square, got patch_size {tuple(patch_size)}")
    return height


def _check_divisible(img_size: tuple[int, int], patch_size: int) -> None:
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if img_size[0] % patch_size or img_size[1] % patch_size:
        raise ValueError(f"image size {img_size[0]}x{img_size[1]} is not divisible by the patch size {patch_size}")


class PatchEmbed(nn.Module):
    """Image to patch tokens: [N, C, H, W] -> [N, L, D], L = (H/p)(W/p) in row-major patch order.

    Holds ``proj`` (``nn.Conv2d(in_chans, embed_dim, p, stride=p)``), the layout of timm's ``PatchEmbed``, so
    state-dict keys read ``patch_embed.proj.{weight,bias}``. ``patch_size`` (an int or a square pair) is stored as
    a pair, as in timm, and an input of another size than ``img_size`` is refused, as timm's default does.

    Equivalent PyTorch::

        x = proj(imgs).flatten(2).transpose(1, 2)
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: Union[int, tuple[int, int]] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        patch_size = _square(patch_size)
        _check_divisible(self.img_size, patch_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        # a convolution also takes an unbatched [C, H, W]; the flatten below would then mix up the axes
        if imgs.dim() != 4:
            raise ValueError(f"imgs must be [N, C, H, W], got shape {tuple(imgs.shape)}")
        if tuple(imgs.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {imgs.shape[-2]}x{imgs.shape[-1]} does not match the patch embedding's "
                             f"{self.img_size[0]}x{self.img_size[1]}")
        return self.proj(imgs).flatten(2).transpose(1, 2)


class TubeletEmbed(nn.Module):
    """Video to cube tokens: [N, C, T, H, W] -> [N, L, D], L = (T/p_t)(H/p)(W/p), tokens ordered (t, h, w).

    Holds ``proj`` (``nn.Conv3d(in_chans, embed_dim, (p_t, p, p), stride=(p_t, p, p))``, with bias), the layout
    of VideoMAE's cube embedding.

    Equivalent PyTorch::

        x = proj(videos).flatten(2).transpose(1, 2)
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: Union[int, tuple[int, int]] = 16,
        num_frames: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        patch_size = _square(patch_size)
        _check_divisible(self.img_size, patch_size)
        if tubelet_size <= 0 or num_frames % tubelet_size:
            raise ValueError(f"num_frames {num_frames} is not divisible by the tubelet size {tubelet_size}")
        self.patch_size = (patch_size, patch_size)
        self.tubelet_size = tubelet_size
        self.num_frames = num_frames
        self.grid_size = (num_frames // tubelet_size, self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        expected = (self.num_frames, *self.img_size)
        if videos.dim() != 5:
            raise ValueError(f"videos must be [N, C, T, H, W], got shape {tuple(videos.shape)}")
        if tuple(videos.shape[-3:]) != expected:
            raise ValueError(f"input size {'x'.join(map(str, videos.shape[-3:]))} (frames x height x width) does not "
                             f"match the tubelet embedding's {'x'.join(map(str, expected))}")
        return self.proj(videos).flatten(2).transpose(1, 2)
