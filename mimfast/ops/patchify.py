"""Patchify / unpatchify for images and videos, and the input checks every patch-based op shares.

Patch order is row-major over the patch grid; inside a patch the values are (row, col, channel) with the
channel fastest. Video tokens are ordered (t, h, w) and the values inside a cube (t, row, col, channel).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch

__all__ = ["patchify", "unpatchify", "check_images", "grid_size", "patch_dim", "in_patch_span", "span_reasons"]


def grid_size(
    shape: torch.Size | tuple[int, ...], patch_size: int, tubelet_size: Optional[int] = None
) -> tuple[int, ...]:
    """Patch grid of an image [N,C,H,W] -> (h, w), or of a video [N,C,T,H,W] -> (t, h, w)."""
    if len(shape) == 4:
        return (shape[2] // patch_size, shape[3] // patch_size)
    return (shape[2] // (tubelet_size or 1), shape[3] // patch_size, shape[4] // patch_size)


def patch_dim(channels: int, patch_size: int, tubelet_size: Optional[int] = None) -> int:
    """P, the number of values per patch (or per cube)."""
    return (tubelet_size or 1) * patch_size * patch_size * channels


def span_reasons(named: dict[str, Optional[torch.Tensor]], patch_size: int, tubelet_size: Optional[int] = None
                 ) -> list[str]:
    """Backend refusals for image-like tensors whose patches span offsets past int32 (see :func:`in_patch_span`)."""
    out = []
    for name, t in named.items():
        span = in_patch_span(t, patch_size, tubelet_size) if t is not None and t.dim() in (4, 5) else 0
        if span >= 2**31:
            out.append(f"the values of one patch of {name} lie {span} elements apart, past the kernels' int32 "
                       "offsets inside a patch (a view into a buffer of over 2^31 elements?): pass a contiguous copy "
                       "or use backend='torch'")
    return out


def in_patch_span(imgs: torch.Tensor, patch_size: int, tubelet_size: Optional[int] = None) -> int:
    """Largest element offset between two values of one patch of ``imgs`` [N,C,H,W] or [N,C,T,H,W]: the kernels
    hold offsets inside a patch in int32 (the patch's base offset in int64), so this must stay below 2^31."""
    s_c, s_h, s_w = (abs(v) for v in (imgs.stride(1), imgs.stride(-2), imgs.stride(-1)))
    s_t = abs(imgs.stride(2)) if imgs.dim() == 5 else 0
    return (imgs.shape[1] - 1) * s_c + ((tubelet_size or 1) - 1) * s_t + (patch_size - 1) * (s_h + s_w)


def as_size(value: Any) -> Any:
    """A patch or tubelet size given as any integer (a NumPy one too) as a Python int, which the kernels' launch
    arithmetic needs; other values unchanged, for :func:`check_images` to refuse."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def check_images(imgs: torch.Tensor, patch_size: int, tubelet_size: Optional[int] = None, name: str = "imgs") -> None:
    """Raise a clear error unless ``imgs`` is a floating [N,C,H,W] (or [N,C,T,H,W] with a tubelet) batch whose
    spatial (and temporal) sizes divide by the patch (and tubelet) size."""
    if not isinstance(imgs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(imgs).__name__}")
    video = tubelet_size is not None
    want = 5 if video else 4
    if imgs.dim() != want:
        layout = "[N, C, T, H, W]" if video else "[N, C, H, W]"
        raise ValueError(f"{name} must be {layout}, got shape {tuple(imgs.shape)}")
    if not imgs.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (convert integer images with .float() / 255), "
                        f"got {imgs.dtype}")
    for what, size in (("patch_size", patch_size),) + ((("tubelet_size", tubelet_size),) if video else ()):
        if not isinstance(size, numbers.Integral) or isinstance(size, bool):
            raise TypeError(f"{what} must be an int, got {size!r}")
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    H, W = imgs.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"{name} size {H}x{W} is not divisible by the patch size {patch_size}")
    if video:
        if tubelet_size <= 0:
            raise ValueError(f"tubelet_size must be positive, got {tubelet_size}")
        T = imgs.shape[2]
        if T % tubelet_size:
            raise ValueError(f"{name} has {T} frames, not divisible by the tubelet size {tubelet_size}")


def patchify(imgs: torch.Tensor, patch_size: int, tubelet_size: Optional[int] = None) -> torch.Tensor:
    """[N,C,H,W] -> [N, L, p*p*C]; or [N,C,T,H,W] -> [N, L, p_t*p*p*C] with ``tubelet_size`` p_t.

    Equivalent PyTorch (image)::

        x = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(N, h * w, p * p * C)
    """
    check_images(imgs, patch_size, tubelet_size)
    p = patch_size
    if tubelet_size is None:
        N, C, H, W = imgs.shape
        h, w = H // p, W // p
        x = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(N, h * w, p * p * C)
    N, C, T, H, W = imgs.shape
    pt = tubelet_size
    t, h, w = T // pt, H // p, W // p
    x = imgs.reshape(N, C, t, pt, h, p, w, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(N, t * h * w, pt * p * p * C)


def unpatchify(
    x: torch.Tensor,
    patch_size: int,
    grid: tuple[int, ...],
    channels: int = 3,
    tubelet_size: Optional[int] = None,
) -> torch.Tensor:
    """Inverse of :func:`patchify`: [N, L, P] -> [N,C,H,W] for grid (h, w), or [N,C,T,H,W] for grid (t, h, w)."""
    if x.dim() != 3:
        raise ValueError(f"x must be [N, L, P], got shape {tuple(x.shape)}")
    p = patch_size
    N, L, P = x.shape
    expected_L = 1
    for g in grid:
        expected_L *= g
    if L != expected_L or P != patch_dim(channels, p, tubelet_size):
        raise ValueError(f"x of shape {tuple(x.shape)} does not match grid {grid}, patch {p}, "
                         f"tubelet {tubelet_size}, {channels} channels")
    C = channels
    if tubelet_size is None:
        h, w = grid
        return x.reshape(N, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, h * p, w * p)
    t, h, w = grid
    pt = tubelet_size
    y = x.reshape(N, t, h, w, pt, p, p, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return y.reshape(N, C, t * pt, h * p, w * p)
