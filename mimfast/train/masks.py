"""Masks as a pure function of (seed, epoch, sample index, token): counter-based noise, no RNG state.

The noise of token j of data-set sample i in epoch e is a 32-bit integer hash of (seed, epoch, i, j), made
on the device with integer tensor ops (no host sync, no generator). A sample therefore gets the same mask
whichever rank, batch position or micro-step it lands in, and a resumed run draws exactly the masks of an
uninterrupted one. Random, SimMIM and tube masks are the argsort rule of MAE over that noise (the tokens with the
smallest noise stay visible); importance masks perturb log-scores with Gumbel noise from another hash stream;
per-sample ratios come from a third stream; block-wise masks are :func:`mimfast.ops.block_masking` with the
data-set indices as its ``sample_ids`` and the seed folded with the epoch.
"""

from __future__ import annotations

import math
from typing import Union

import torch

__all__ = ["hash_noise", "mae_noise", "simmim_mask", "tube_mask", "block_mask", "importance_noise", "patch_variance",
           "sample_ratios", "noise_from_mask", "mask_from_noise", "simmim_units", "units_to_patches", "EVAL_EPOCH"]

# Epoch number reserved for evaluation masks, so they differ from every training epoch's.
EVAL_EPOCH = 2**20

_M32 = 0xFFFFFFFF
# hash_noise streams besides the mask noise (0)
_RATIO_STREAM = 1
_GUMBEL_STREAM = 2
DROP_PATH_STREAM = 3  # SimMIM's stochastic depth


def _mul32(x: Union[torch.Tensor, int], c: int) -> Union[torch.Tensor, int]:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64 (or a Python int), without overflowing int64: split c
    into 16-bit halves."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: Union[torch.Tensor, int]) -> Union[torch.Tensor, int]:
    """A 32-bit avalanche finaliser (xor-shift / multiply rounds, as in MurmurHash3's fmix32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_noise(seed: int, epoch: int, indices: torch.Tensor, num_tokens: int, stream: int = 0) -> torch.Tensor:
    """Uniform noise in [0, 1) for ``indices`` [N] int64 (on any device) and tokens 0..num_tokens-1: [N, num_tokens]
    float32 on the indices' device, a deterministic function of (seed, epoch, index, token). Each ``stream`` is
    an independent draw (0: the mask noise; see the module's ``_*_STREAM`` constants)."""
    # the key in Python ints (the same arithmetic): no host-to-device copy, which would synchronise the stream
    key = _mix32(((seed * 0x9E3779B1) & _M32) ^ 0x6D696D66)
    key = _mix32(key ^ (epoch & _M32))
    if stream:
        key = _mix32(key ^ _mul32(stream & _M32, 0xC2B2AE35))
    h = _mix32((indices.to(torch.int64) & _M32) ^ key)  # [N]
    tokens = torch.arange(num_tokens, device=indices.device, dtype=torch.int64)
    h = _mix32(_mix32(h[:, None] ^ _mul32(tokens, 0x85EBCA6B)[None, :]) ^ key)  # [N, L]
    # 24 bits: exactly representable in float32
    return (h >> 8).to(torch.float32) * (1.0 / 2**24)


def mae_noise(seed: int, epoch: int, indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The ``noise`` [N, L] argument of ``MaskedAutoencoderViT.forward``."""
    return hash_noise(seed, epoch, indices, num_patches)


def mask_from_noise(noise: torch.Tensor, num_masked: int) -> torch.Tensor:
    """[N, U] noise -> [N, U] bool, True at the ``num_masked`` largest noise values (the smallest stay visible,
    as in MAE's argsort rule; ties break by index)."""
    rank = torch.argsort(torch.argsort(noise, dim=1, stable=True), dim=1, stable=True)
    return rank >= noise.shape[1] - num_masked


def simmim_units(input_size: int, mask_patch_size: int, model_patch_size: int) -> tuple[int, int]:
    """(units per side, model patches per unit side) of SimMIM's mask units; checks the sizes divide."""
    if input_size % mask_patch_size or mask_patch_size % model_patch_size:
        raise ValueError(f"SimMIM needs input size {input_size} divisible by the mask patch size {mask_patch_size} "
                         f"and that divisible by the model patch size {model_patch_size}")
    return input_size // mask_patch_size, mask_patch_size // model_patch_size


def units_to_patches(unit_mask: torch.Tensor, side: int, scale: int) -> torch.Tensor:
    """[N, side*side] mask of square units -> [N, L] at model-patch granularity (each unit scale x scale patches)."""
    grid = unit_mask.view(-1, side, side)
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return grid.reshape(grid.shape[0], -1)


def simmim_mask(seed: int, epoch: int, indices: torch.Tensor, input_size: int, mask_patch_size: int,
                model_patch_size: int, mask_ratio: float) -> torch.Tensor:
    """SimMIM masks [N, L] bool at model-patch granularity: ceil(units * ratio) of the (input/mask_patch)^2 mask
    units are masked, each unit covering (mask_patch/model_patch)^2 model patches."""
    side, scale = simmim_units(input_size, mask_patch_size, model_patch_size)
    units = side * side
    unit_mask = mask_from_noise(hash_noise(seed, epoch, indices, units), math.ceil(units * mask_ratio))
    return units_to_patches(unit_mask, side, scale)


def tube_mask(seed: int, epoch: int, indices: torch.Tensor, grid_thw: tuple[int, int, int],
              mask_ratio: float) -> torch.Tensor:
    """VideoMAE tube masks [N, t*h*w] bool: one spatial mask of int(h*w*ratio) patches shared by every time slice
    (tokens ordered (t, h, w))."""
    t, h, w = grid_thw
    spatial = mask_from_noise(hash_noise(seed, epoch, indices, h * w), int(h * w * mask_ratio))
    return spatial.unsqueeze(1).expand(-1, t, -1).reshape(spatial.shape[0], t * h * w)


def sample_ratios(seed: int, epoch: int, indices: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Per-sample mask ratios [N] float64, uniform in [low, high] and a function of (seed, epoch, index): pass CPU
    indices, so the ragged kept counts are known on the host without reading the device."""
    u = hash_noise(seed, epoch, indices, 1, stream=_RATIO_STREAM)[:, 0].double()
    return low + (high - low) * u


def block_mask(seed: int, epoch: int, indices: torch.Tensor, grid: tuple[int, int], num_masked: int,
               min_num_patches: int, device: torch.device) -> torch.Tensor:
    """BEiT block-wise masks [N, h*w] bool on ``device`` with exactly ``num_masked`` patches each, a function of
    (seed, epoch, index) (:func:`mimfast.ops.block_masking` with the data-set indices as ``sample_ids``)."""
    from mimfast.ops import block_masking
    from mimfast.ops.random_masking import fold_seed

    info = block_masking(indices.shape[0], grid, num_masked, min_num_patches,
                         seed=fold_seed(seed, epoch), sample_ids=indices, device=device)
    return info.mask.bool()


def noise_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[N, L] bool mask (True = removed, the same count per row) -> [N, L] float32 ``noise`` whose argsort rule
    (MAE's ``forward(imgs, mask_ratio, noise)``) keeps exactly the unmasked patches, in ascending order."""
    L = mask.shape[1]
    order = torch.arange(L, device=mask.device, dtype=torch.float32) / (2 * L)  # distinct, below 1/2
    return mask.to(torch.float32) + order


def patch_variance(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L] float32 variance of the pixels (all channels) of each ``patch_size`` square, the
    importance score."""
    from mimfast.ops.patchify import patchify

    return patchify(images.float(), patch_size).var(-1, unbiased=False)


def importance_noise(seed: int, epoch: int, indices: torch.Tensor, scores: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """[N, L] noise whose argsort rule keeps K patches drawn without replacement with probability proportional to
    (scores + 1e-6) ** (1 / temperature) (Gumbel-top-k; the floor lets flat patches fill a count the textured ones
    cannot, in random order). A function of (seed, epoch, index) and the scores."""
    from mimfast.ops.masking import gumbel_top_k_noise

    indices = indices.to(scores.device, non_blocking=True)
    u = hash_noise(seed, epoch, indices, scores.shape[1], stream=_GUMBEL_STREAM)
    u = (torch.floor(u * 2.0**23) + 0.5) * 2.0**-23  # 23 bits centred in their bin, exact in float32: never 0 or 1
    return gumbel_top_k_noise(scores.float() + 1e-6, temperature, u)
