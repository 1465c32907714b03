"""Masks as a pure function of (seed, epoch, sample index, token): counter-based noise, no RNG state.

The noise of token j of data-set sample i in epoch e is a 32-bit integer hash of (seed, epoch, i, j), made
on the device with integer tensor ops (no host sync, no generator). A sample therefore gets the same mask
whichever rank, batch position or micro-step it lands in, and a resumed run draws exactly the masks of an
uninterrupted one. Every mask is then the argsort rule of MAE over that noise: the tokens with the smallest
noise stay visible.
"""

from __future__ import annotations

import math

import torch

__all__ = ["hash_noise", "mae_noise", "simmim_mask", "tube_mask", "EVAL_EPOCH"]

# Epoch number reserved for evaluation masks, so they differ from every training epoch's.
EVAL_EPOCH = 2**20

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without overflowing int64: split c into 16-bit halves."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche finaliser (xor-shift / multiply rounds, as in MurmurHash3's fmix32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_noise(seed: int, epoch: int, indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Uniform noise in [0, 1) for ``indices`` [N] int64 (on any device) and tokens 0..num_tokens-1: [N, num_tokens]
    float32 on the indices' device, a deterministic function of (seed, epoch, index, token)."""
    key = _mix32(torch.tensor((seed * 0x9E3779B1) & _M32, dtype=torch.int64) ^ 0x6D696D66)
    key = _mix32(key ^ (epoch & _M32))
    key = key.to(indices.device)
    h = _mix32((indices.to(torch.int64) & _M32) ^ key)  # [N]
    tokens = torch.arange(num_tokens, device=indices.device, dtype=torch.int64)
    h = _mix32(_mix32(h[:, None] ^ _mul32(tokens, 0x85EBCA6B)[None, :]) ^ key)  # [N, L]
    # 24 bits: exactly representable in float32
    return (h >> 8).to(torch.float32) * (1.0 / 2**24)


def mae_noise(seed: int, epoch: int, indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The ``noise`` [N, L] argument of ``MaskedAutoencoderViT.forward``."""
    return hash_noise(seed, epoch, indices, num_patches)


def _mask_lowest(noise: torch.Tensor, num_masked: int) -> torch.Tensor:
    """[N, U] noise -> [N, U] bool, True at the ``num_masked`` largest noise values (the smallest stay visible,
    as in MAE's argsort rule; ties break by index)."""
    rank = torch.argsort(torch.argsort(noise, dim=1, stable=True), dim=1, stable=True)
    return rank >= noise.shape[1] - num_masked


def simmim_mask(seed: int, epoch: int, indices: torch.Tensor, input_size: int, mask_patch_size: int,
                model_patch_size: int, mask_ratio: float) -> torch.Tensor:
    """SimMIM masks [N, L] bool at model-patch granularity: ceil(units * ratio) of the (input/mask_patch)^2 mask
    units are masked, each unit covering (mask_patch/model_patch)^2 model patches."""
    if input_size % mask_patch_size or mask_patch_size % model_patch_size:
        raise ValueError(f"SimMIM needs input size {input_size} divisible by the mask patch size {mask_patch_size} "
                         f"and that divisible by the model patch size {model_patch_size}")
    side = input_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    units = side * side
    unit_mask = _mask_lowest(hash_noise(seed, epoch, indices, units), math.ceil(units * mask_ratio))
    grid = unit_mask.view(-1, side, side)
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return grid.reshape(grid.shape[0], -1)


def tube_mask(seed: int, epoch: int, indices: torch.Tensor, grid_thw: tuple[int, int, int],
              mask_ratio: float) -> torch.Tensor:
    """VideoMAE tube masks [N, t*h*w] bool: one spatial mask of int(h*w*ratio) patches shared by every time slice
    (tokens ordered (t, h, w))."""
    t, h, w = grid_thw
    spatial = _mask_lowest(hash_noise(seed, epoch, indices, h * w), int(h * w * mask_ratio))
    return spatial.unsqueeze(1).expand(-1, t, -1).reshape(spatial.shape[0], t * h * w)
