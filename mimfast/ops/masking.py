"""Mask generators beyond MAE random masking: SimMIM, BEiT block-wise, VideoMAE tube, importance (score-driven),
per-sample ratios (ragged, for a packed variable-length encoder), and a progressive ratio schedule.

Every generator returns :class:`~mimfast.ops.random_masking.MaskInfo` (or :class:`RaggedMaskInfo`) with
mask 1 = removed, and is reproducible: randomness comes from ``seed`` (an int in [0, 2**63)) or, when it is None,
from one seed drawn on the host from ``generator`` (torch's default CPU generator when None; see
:func:`~mimfast.ops.random_masking.draw_seed`). Sample n's mask depends only on (seed, sample_offset + n) (for
block-wise masking, on (seed, sample_ids[n]) when ``sample_ids`` is given), so passing the global sample index as
``sample_offset`` (or folding rank and epoch into the seed with
:func:`~mimfast.ops.random_masking.fold_seed`) makes masks distinct across data-parallel ranks and independent
of how a batch is split. For a given seed every backend returns the same masks.

Generators whose mask has no order of its own (SimMIM, block, tube) list the kept patches in ascending index order
and set ids_restore = argsort(cat(kept ascending, removed ascending)), the layout random masking produces, so
the same gather / restore code consumes every generator.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from mimfast.backend import get_op
from mimfast.ops.gather_patches import mark_valid_index
from mimfast.ops.random_masking import (
    _MASK32,
    Device,
    MaskInfo,
    _empty,
    _masking_from_order,
    check_mask_ratio,
    check_seed,
    check_sizes,
    draw_seed,
    host_checks,
    is_int,
    is_number,
    key_index_bits,
    num_kept,
    philox4x32,
    random_keys_ref,
    random_masking_kept_triton,
    resolve_device,
    triton_masking_reasons,
)

__all__ = [
    "RaggedMaskInfo",
    "mask_info_from_mask",
    "shuffle_from_mask",
    "simmim_masking",
    "simmim_masking_ref",
    "block_masking",
    "block_masking_ref",
    "tube_masking",
    "tube_masking_ref",
    "importance_masking",
    "importance_masking_ref",
    "ratio_schedule",
    "ragged_random_masking",
    "seeded_noise",
    "ragged_random_masking_ref",
]

# Philox streams (fourth counter word): random keys use 0, importance masking's Gumbel noise 1, seeded_noise 2.
_GUMBEL_STREAM = 1
_NOISE_STREAM = 2


class RaggedMaskInfo(NamedTuple):
    """Output of :func:`ragged_random_masking`: each sample keeps its own number of patches.

    ids_keep_packed: [T] int64, kept patch indices of every sample back to back (sample n at
                     cu_seqlens[n]:cu_seqlens[n+1], in shuffled order), T = sum(num_kept)
    cu_seqlens:      [N + 1] int32, cumulative kept counts starting at 0 (the layout of packed attention)
    max_seqlen:      int, max(num_kept) (0 when N == 0)
    ids_restore:     [N, L] int64, position of each patch in its sample's (kept, removed) shuffled order
    mask:            [N, L] float32, 1 = removed
    num_kept:        [N] int64, kept patches per sample
    """

    ids_keep_packed: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    ids_restore: torch.Tensor
    mask: torch.Tensor
    num_kept: torch.Tensor


def _resolve_seed(seed: Optional[int], generator: Optional[torch.Generator]) -> int:
    return draw_seed(generator) if seed is None else seed


def mask_info_from_mask(mask: torch.Tensor, num_keep: Optional[int] = None) -> MaskInfo:
    """[N, L] mask (bool or 0/1, 1 = removed, the same count in every row) -> :class:`MaskInfo`.

    ids_keep lists the kept patches in ascending order, ids_restore = argsort(cat(kept, removed)) with both parts
    ascending, computed with cumulative sums (no sort). Pass ``num_keep`` (K) when it is known to skip the count
    check, which reads the mask back to the host.

    Equivalent PyTorch::

        ids_shuffle = torch.argsort(mask.float(), dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :K]
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-D [N, L] tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    removed = mask.bool()
    N = mask.shape[0]
    if num_keep is None:
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must hold only 0 and 1 (or be bool)")
        counts = (~removed).sum(1)
        num_keep = int(counts[0]) if N else 0
        if N and not bool((counts == num_keep).all()):
            raise ValueError(f"every row of mask must keep the same number of patches, got counts {counts.tolist()}")
    ids_shuffle, ids_restore = shuffle_from_mask(removed, num_keep)
    ids_keep = ids_shuffle[:, :num_keep].contiguous()
    return MaskInfo(ids_keep, ids_restore, removed.to(torch.float32))


def shuffle_from_mask(removed: torch.Tensor, num_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [N, L] (True = removed, ``num_keep`` False per row) -> (ids_shuffle, ids_restore) [N, L] int64: the
    kept patches then the removed ones, each ascending, and its inverse; cumulative sums and a scatter, no sort
    and no host synchronisation."""
    kept_rank = (~removed).long().cumsum(1) - 1
    removed_rank = removed.long().cumsum(1) - 1 + num_keep
    ids_restore = torch.where(removed, removed_rank, kept_rank)
    positions = torch.arange(removed.shape[1], device=removed.device).expand_as(ids_restore)
    ids_shuffle = torch.empty_like(ids_restore).scatter_(1, ids_restore, positions)
    return ids_shuffle, ids_restore


def _unit_mask(N: int, U: int, K: int, seed: int, sample_offset: int, device: Device, use_triton: bool) -> torch.Tensor:
    """[N, U] float mask keeping K random units per sample: the first K in the order of the Philox keys."""
    if use_triton:
        return random_masking_kept_triton(N, U, K, device=device, seed=seed, sample_offset=sample_offset).mask
    return _masking_from_order(random_keys_ref(N, U, seed, sample_offset, device), K).mask


# ---------------------------------------------------------------------------------------------------------- SimMIM


def _pair(v: Union[int, Sequence[int]], name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(is_int(x) and x > 0 for x in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return pair


def _simmim_geometry(input_size, mask_patch_size: int, model_patch_size: int) -> tuple[tuple[int, int], int]:
    H, W = _pair(input_size, "input_size")
    for name, v in (("mask_patch_size", mask_patch_size), ("model_patch_size", model_patch_size)):
        if not is_int(v) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if H % mask_patch_size or W % mask_patch_size:
        raise ValueError(f"input_size {H}x{W} is not divisible by mask_patch_size {mask_patch_size}")
    if mask_patch_size % model_patch_size:
        raise ValueError(f"mask_patch_size {mask_patch_size} is not divisible by model_patch_size {model_patch_size}")
    return (H // mask_patch_size, W // mask_patch_size), mask_patch_size // model_patch_size


def _simmim(N, input_size, mask_patch_size, model_patch_size, mask_ratio, seed, sample_offset, device, use_triton):
    (gh, gw), scale = _simmim_geometry(input_size, mask_patch_size, model_patch_size)
    units = gh * gw
    count = int(math.ceil(units * mask_ratio))
    unit_mask = _unit_mask(N, units, units - count, seed, sample_offset, device, use_triton)
    mask = unit_mask.view(N, gh, 1, gw, 1).expand(N, gh, scale, gw, scale).reshape(N, gh * scale * gw * scale)
    return mask_info_from_mask(mask, (units - count) * scale * scale)


def simmim_masking_ref(N: int, input_size: Union[int, tuple[int, int]] = 192, mask_patch_size: int = 32,
                       model_patch_size: int = 4, mask_ratio: float = 0.6, *, seed: int = 0, sample_offset: int = 0,
                       device: Device = None) -> MaskInfo:
    """Torch implementation of :func:`simmim_masking` for a resolved seed (units chosen by argsort of keys)."""
    return _simmim(N, input_size, mask_patch_size, model_patch_size, mask_ratio, seed, sample_offset, device, False)


def _simmim_triton(N: int, input_size: Union[int, tuple[int, int]] = 192, mask_patch_size: int = 32,
                   model_patch_size: int = 4, mask_ratio: float = 0.6, *, seed: int = 0, sample_offset: int = 0,
                   device: Device = None) -> MaskInfo:
    return _simmim(N, input_size, mask_patch_size, model_patch_size, mask_ratio, seed, sample_offset, device, True)


def _simmim_reasons(N, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6, *, device=None,
                    **_) -> list[str]:
    (gh, gw), _scale = _simmim_geometry(input_size, mask_patch_size, model_patch_size)
    return triton_masking_reasons(gh * gw, None, device)


_simmim_op = get_op("simmim_masking")
_simmim_op.register("torch")(simmim_masking_ref)
_simmim_op.register("triton", reasons=_simmim_reasons)(_simmim_triton)


def simmim_masking(
    N: int,
    input_size: Union[int, tuple[int, int]] = 192,
    mask_patch_size: int = 32,
    model_patch_size: int = 4,
    mask_ratio: float = 0.6,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
    device: Device = None,
    backend: Optional[str] = None,
) -> MaskInfo:
    """SimMIM masking: random mask units of ``mask_patch_size`` pixels, upsampled to model-patch tokens.

    The image (``input_size`` H = W, or (H, W)) is cut into U = (H / mask_patch_size) * (W / mask_patch_size)
    units; each sample masks count = ceil(U * mask_ratio) of them at random, and each unit covers
    s x s tokens, s = mask_patch_size / model_patch_size. Returns MaskInfo over L = U * s * s tokens (row-major
    token grid of H / model_patch_size x W / model_patch_size), K = (U - count) * s * s, kept ids ascending.

    Equivalent PyTorch (per sample)::

        units = torch.zeros(U); units[torch.randperm(U)[:count]] = 1
        mask = units.view(gh, gw).repeat_interleave(s, 0).repeat_interleave(s, 1).flatten()
    """
    check_sizes(N, 1)
    check_mask_ratio(mask_ratio)
    check_seed(seed, sample_offset, N)
    _simmim_geometry(input_size, mask_patch_size, model_patch_size)
    return _simmim_op(N, input_size, mask_patch_size, model_patch_size, mask_ratio, seed=_resolve_seed(seed, generator),
                      sample_offset=sample_offset, device=device, backend=backend)


# ----------------------------------------------------------------------------------------------------------- tube


def _check_grid(grid: Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    g = tuple(grid) if not isinstance(grid, int) else (grid,) * dims
    if len(g) != dims or not all(is_int(x) and x > 0 for x in g):
        raise ValueError(f"{name} must be {dims} positive ints, got {grid!r}")
    return g


def tube_kept_per_frame(frame_size: int, mask_ratio: float) -> int:
    """Kept patches per time slice: frame_size - int(mask_ratio * frame_size), as VideoMAE's tube generator."""
    check_mask_ratio(mask_ratio)
    return frame_size - int(mask_ratio * frame_size)


def _tube(N, grid_thw, mask_ratio, seed, sample_offset, device, use_triton):
    T, h, w = _check_grid(grid_thw, 3, "grid_thw")
    K_frame = tube_kept_per_frame(h * w, mask_ratio)
    frame_mask = _unit_mask(N, h * w, K_frame, seed, sample_offset, device, use_triton)
    return mask_info_from_mask(frame_mask.repeat(1, T), T * K_frame)


def tube_masking_ref(N: int, grid_thw: tuple[int, int, int], mask_ratio: float, *, seed: int = 0,
                     sample_offset: int = 0, device: Device = None) -> MaskInfo:
    """Torch implementation of :func:`tube_masking` for a resolved seed."""
    return _tube(N, grid_thw, mask_ratio, seed, sample_offset, device, False)


def _tube_triton(N: int, grid_thw: tuple[int, int, int], mask_ratio: float, *, seed: int = 0,
                 sample_offset: int = 0, device: Device = None) -> MaskInfo:
    return _tube(N, grid_thw, mask_ratio, seed, sample_offset, device, True)


def _tube_reasons(N, grid_thw, mask_ratio, *, device=None, **_) -> list[str]:
    _T, h, w = _check_grid(grid_thw, 3, "grid_thw")
    return triton_masking_reasons(h * w, None, device)


_tube_op = get_op("tube_masking")
_tube_op.register("torch")(tube_masking_ref)
_tube_op.register("triton", reasons=_tube_reasons)(_tube_triton)


def tube_masking(
    N: int,
    grid_thw: tuple[int, int, int],
    mask_ratio: float,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
    device: Device = None,
    backend: Optional[str] = None,
) -> MaskInfo:
    """VideoMAE tube masking: one random spatial mask per sample, shared by every time slice.

    ``grid_thw`` = (t, h, w) token grid (e.g. (8, 14, 14) for 16 frames, tubelet 2, 224 px, patch 16); tokens are
    ordered (t, h, w), L = t*h*w. Each frame keeps h*w - int(mask_ratio * h*w) patches (VideoMAE's count, which
    can differ by one from int(L * (1 - mask_ratio))), so K = t * that. Kept ids ascending.

    Equivalent PyTorch (per sample)::

        frame = torch.zeros(h * w); frame[torch.randperm(h * w)[:int(mask_ratio * h * w)]] = 1
        mask = frame.repeat(t)
    """
    check_sizes(N, 1)
    check_mask_ratio(mask_ratio)
    check_seed(seed, sample_offset, N)
    _check_grid(grid_thw, 3, "grid_thw")
    return _tube_op(N, grid_thw, mask_ratio, seed=_resolve_seed(seed, generator), sample_offset=sample_offset,
                    device=device, backend=backend)


# ----------------------------------------------------------------------------------------------------- block-wise


# Philox streams of block-wise masking (fourth counter word): rectangles, then the single patches completing a count
_BLOCK_STREAM = 3
_BLOCK_FILL_STREAM = 4
BLOCK_ATTEMPTS = 10  # rectangle draws per round, as BEiT
ASPECT_BITS = 10  # log-uniform aspect ratios in 2^10 bins
_FIXED_ONE = 1 << 16  # areas and aspect ratios in units of 2^-16
# the kernel's int64 products area * aspect stay below 2^62 while max(L, min_num_patches) * aspect_bound < 2^30
_BLOCK_PRODUCT_LIMIT = 1 << 30


@functools.lru_cache(maxsize=32)
def aspect_table(log_aspect: tuple[float, float]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(aspect, 1 / aspect) at the centres of 2^ASPECT_BITS equal bins of [log min_aspect, log max_aspect], in
    units of 2^-16: the aspect ratios block-wise masking draws from (computed once on the host for every backend)."""
    lo, hi = log_aspect
    bins = 1 << ASPECT_BITS
    centres = [lo + (j + 0.5) * (hi - lo) / bins for j in range(bins)]
    return (tuple(round(math.exp(c) * _FIXED_ONE) for c in centres),
            tuple(round(math.exp(-c) * _FIXED_ONE) for c in centres))


def _rectangle_side(area_q: int, aspect_q: int) -> int:
    """round-half-up(sqrt(area * aspect)) for area and aspect in units of 2^-16, exactly: side i fits when
    (i - 1/2)^2 <= area * aspect, i.e. (2i - 1)^2 <= area_q * aspect_q / 2^30."""
    return (math.isqrt((area_q * aspect_q) >> 30) + 1) // 2


def _block_mask_one(seed: int, sample: int, height: int, width: int, target: int, min_num_patches: int,
                    max_num_patches: int, table: tuple[tuple[int, ...], tuple[int, ...]]) -> list[bool]:
    """BEiT block-wise mask of global sample ``sample``: rectangles until ``target`` patches are masked, then random
    single patches to make the count exact when the rectangles get stuck (so every sample masks the same number).
    Randomness: Philox words of counter (attempt slot, sample low, sample high, _BLOCK_STREAM), in Python integers;
    the kernel in :mod:`mimfast.kernels.block_masking` follows the same steps."""
    aspects, inverses = table
    masked = [False] * (height * width)
    s_lo, s_hi = sample & _MASK32, sample >> 32
    count, round_ = 0, 0
    while count < target:
        budget = min(target - count, max_num_patches)
        added = 0
        for attempt in range(BLOCK_ATTEMPTS):
            r0, r1, r2, r3 = philox4x32(seed, round_ * BLOCK_ATTEMPTS + attempt, s_lo, s_hi, _BLOCK_STREAM)
            # area uniform between min_num_patches and budget (either may be the larger), 16 fractional bits
            area_q = min_num_patches * _FIXED_ONE + (budget - min_num_patches) * (r0 >> 16)
            bin_ = r1 >> (32 - ASPECT_BITS)
            h = _rectangle_side(area_q, aspects[bin_])
            w = _rectangle_side(area_q, inverses[bin_])
            if not (0 < h < height and 0 < w < width):
                continue
            top = (r2 * (height - h + 1)) >> 32
            left = (r3 * (width - w + 1)) >> 32
            fresh = [r * width + c for r in range(top, top + h) for c in range(left, left + w)
                     if not masked[r * width + c]]
            if 0 < len(fresh) <= budget:
                for i in fresh:
                    masked[i] = True
                added = len(fresh)
                break
        if added == 0:
            break
        count += added
        round_ += 1
    if count < target:
        L = height * width
        keys = random_keys_ref(1, L, seed, sample, stream=_BLOCK_FILL_STREAM)[0].tolist()
        free = sorted((keys[i], i) for i in range(L) if not masked[i])
        for _, i in free[:target - count]:
            masked[i] = True
    return masked


def _block_args(grid, num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect):
    height, width = _check_grid(grid, 2, "grid")
    L = height * width
    if not is_int(num_masking_patches) or not 0 <= num_masking_patches <= L:
        raise ValueError(f"num_masking_patches must be an int in [0, {L}], got {num_masking_patches!r}")
    if not is_int(min_num_patches) or min_num_patches < 1:
        raise ValueError(f"min_num_patches must be a positive int, got {min_num_patches!r}")
    if max_num_patches is None:
        max_num_patches = num_masking_patches
    elif not is_int(max_num_patches) or max_num_patches < 1:
        raise ValueError(f"max_num_patches must be a positive int, got {max_num_patches!r}")
    if not (is_number(min_aspect) and 0 < min_aspect < math.inf):
        raise ValueError(f"min_aspect must be a positive finite number, got {min_aspect!r}")
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    if not (is_number(max_aspect) and min_aspect <= max_aspect < math.inf):
        raise ValueError(f"need 0 < min_aspect <= max_aspect < inf, got {min_aspect}, {max_aspect}")
    return height, width, max_num_patches, (math.log(min_aspect), math.log(max_aspect))


def block_masking_ref(N: int, grid: Union[int, tuple[int, int]], num_masking_patches: int, min_num_patches: int = 4,
                      max_num_patches: Optional[int] = None, min_aspect: float = 0.3,
                      max_aspect: Optional[float] = None, *, seed: int = 0, sample_offset: int = 0,
                      sample_ids: Union[torch.Tensor, Sequence[int], None] = None,
                      device: Device = None) -> MaskInfo:
    """Torch implementation of :func:`block_masking` for a resolved seed: the rectangles of each sample drawn on the
    host (Python integers), the mask moved to ``device``. ``sample_ids`` on a device is read back (a sync)."""
    height, width, max_num_patches, log_aspect = _block_args(grid, num_masking_patches, min_num_patches,
                                                             max_num_patches, min_aspect, max_aspect)
    table = aspect_table(log_aspect)
    if sample_ids is None:
        samples = range(sample_offset, sample_offset + N)
    else:
        samples = sample_ids.tolist() if isinstance(sample_ids, torch.Tensor) else sample_ids
    rows = [_block_mask_one(seed, sample, height, width, num_masking_patches, min_num_patches, max_num_patches,
                            table) for sample in samples]
    mask = torch.tensor(rows, dtype=torch.bool).reshape(N, height * width)
    mask = _host_to_device(mask, resolve_device(None, device))
    return mask_info_from_mask(mask, height * width - num_masking_patches)


@functools.lru_cache(maxsize=32)
def _aspect_tensor(log_aspect: tuple[float, float], device: torch.device) -> torch.Tensor:
    """:func:`aspect_table` as a [2, 2^ASPECT_BITS] int64 tensor on ``device``, built once per (range, device)."""
    return _host_to_device(torch.tensor(aspect_table(log_aspect), dtype=torch.int64), device)


def _block_launch(N: int, height: int, width: int, num_masking_patches: int, min_num_patches: int,
                  max_num_patches: int, log_min_aspect: float, log_max_aspect: float, seed: int, sample_offset: int,
                  device: torch.device, sample_ids: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from mimfast.kernels.block_masking import launch_block_masking

    L = height * width
    K = L - num_masking_patches
    ids_keep = _empty((N, K), torch.int64, device)
    ids_restore = _empty((N, L), torch.int64, device)
    mask = _empty((N, L), torch.float32, device)
    launch_block_masking(ids_keep, ids_restore, mask, _aspect_tensor((log_min_aspect, log_max_aspect), device),
                         sample_ids,
                         height=height, width=width, min_num_patches=min_num_patches,
                         max_num_patches=max_num_patches, seed=seed, sample_offset=sample_offset,
                         attempts=BLOCK_ATTEMPTS, block_stream=_BLOCK_STREAM, fill_stream=_BLOCK_FILL_STREAM,
                         index_bits=key_index_bits(L))
    return ids_keep, ids_restore, mask


# as for random masking: compiled graphs trace the custom op, eager calls launch directly
_block_kernel_op = torch.library.custom_op("mimfast::block_masking", mutates_args=())(_block_launch)


@_block_kernel_op.register_fake
def _(N, height, width, num_masking_patches, min_num_patches, max_num_patches, log_min_aspect, log_max_aspect, seed,
      sample_offset, device, sample_ids=None):
    L = height * width
    return (torch.empty(N, L - num_masking_patches, dtype=torch.int64, device=device),
            torch.empty(N, L, dtype=torch.int64, device=device),
            torch.empty(N, L, dtype=torch.float32, device=device))


def _block_triton(N: int, grid: Union[int, tuple[int, int]], num_masking_patches: int, min_num_patches: int = 4,
                  max_num_patches: Optional[int] = None, min_aspect: float = 0.3,
                  max_aspect: Optional[float] = None, *, seed: int = 0, sample_offset: int = 0,
                  sample_ids: Union[torch.Tensor, Sequence[int], None] = None, device: Device = None) -> MaskInfo:
    height, width, max_num_patches, (lo, hi) = _block_args(grid, num_masking_patches, min_num_patches,
                                                           max_num_patches, min_aspect, max_aspect)
    device = resolve_device(None, device)
    if sample_ids is not None and not isinstance(sample_ids, torch.Tensor):
        sample_ids = _host_to_device(torch.tensor(sample_ids, dtype=torch.int64), device)
    elif sample_ids is not None:
        sample_ids = sample_ids.to(device=device, dtype=torch.int64).contiguous()
    launch = _block_kernel_op if torch.compiler.is_compiling() else _block_launch
    ids_keep, ids_restore, mask = launch(N, height, width, num_masking_patches, min_num_patches, max_num_patches,
                                         lo, hi, seed, sample_offset, device, sample_ids)
    return MaskInfo(ids_keep, ids_restore, mask)


def _block_reasons(N, grid, num_masking_patches, min_num_patches=4, max_num_patches=None, min_aspect=0.3,
                   max_aspect=None, *, device=None, **_) -> list[str]:
    height, width, _max, log_aspect = _block_args(grid, num_masking_patches, min_num_patches, max_num_patches,
                                                  min_aspect, max_aspect)
    reasons = triton_masking_reasons(height * width, None, device)
    aspect_bound = math.exp(max(abs(log_aspect[0]), abs(log_aspect[1])))
    if max(height * width, min_num_patches) * aspect_bound >= _BLOCK_PRODUCT_LIMIT:
        reasons.append(f"max(L, min_num_patches) * max(max_aspect, 1 / min_aspect) must stay below 2^30 for the "
                       f"kernel's int64 arithmetic, got {max(height * width, min_num_patches)} * {aspect_bound:.4g}")
    return reasons


_block_op = get_op("block_masking")
_block_op.register("torch")(block_masking_ref)
_block_op.register("triton", reasons=_block_reasons)(_block_triton)


def block_masking(
    N: int,
    grid: Union[int, tuple[int, int]],
    num_masking_patches: int,
    min_num_patches: int = 4,
    max_num_patches: Optional[int] = None,
    min_aspect: float = 0.3,
    max_aspect: Optional[float] = None,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
    sample_ids: Optional[torch.Tensor] = None,
    device: Device = None,
    backend: Optional[str] = None,
) -> MaskInfo:
    """BEiT block-wise masking on a ``grid`` = (h, w) patch grid: exactly ``num_masking_patches`` per sample.

    Rectangles of area uniform in [min_num_patches, remaining budget capped at max_num_patches] and aspect ratio
    log-uniform in [min_aspect, max_aspect] (max_aspect defaults to 1 / min_aspect) are placed uniformly at
    random (strictly smaller than the grid), up to 10 tries per rectangle, each adding at least one and at most
    the remaining budget of new patches, until the target is reached. When no rectangle fits any more, random
    single patches complete the count, so every sample masks exactly ``num_masking_patches`` and the batch stays
    dense. L = h*w, K = L - num_masking_patches, kept ids ascending.

    Randomness is counter-based (Philox of (attempt, sample_offset + n)) and the geometry integer arithmetic
    (areas and aspect ratios with 16 fractional bits, sides rounded exactly), so every backend gives the same
    masks for a seed: ``torch`` draws them on the host and copies the mask to ``device``; ``triton`` runs one
    program per sample, one launch, no host synchronisation.

    ``sample_ids`` [N] (integers in [0, 2**63), with ``seed``, instead of ``sample_offset``) gives each row the
    mask of that global sample, e.g. the data-set indices of a shuffled batch: row n equals row 0 of
    ``block_masking(1, ..., seed=seed, sample_offset=sample_ids[n])``. Pass them on the CPU: ``torch`` reads them
    on the host (device ids would be read back, a sync), ``triton`` copies them to ``device`` without blocking (in
    eager mode; a compiled graph moves them with a plain copy). Without ``device`` the masks go where the ids are.

    Equivalent PyTorch::

        mask = torch.stack([beit_mask_generator() for _ in range(N)]).flatten(1)  # [N, L], 1 = masked
        ids_shuffle = torch.argsort(mask, dim=1, stable=True); ids_restore = torch.argsort(ids_shuffle, dim=1)
    """
    check_sizes(N, 1)
    check_seed(seed, sample_offset, N)
    _check_sample_ids(sample_ids, N, seed, sample_offset)
    _block_args(grid, num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect)
    if sample_ids is not None and device is None:
        device = sample_ids.device  # the only tensor argument decides, as for the other ops
    if sample_ids is not None and sample_ids.device.type == "cpu":
        if torch.compiler.is_compiling():
            sample_ids = sample_ids.to(resolve_device(None, device))
        else:
            # host ids as ints: not a tensor on another device for the dispatcher; torch reads them as they are,
            # triton copies them to the device from pinned memory
            sample_ids = tuple(sample_ids.tolist())
    return _block_op(N, grid, num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect,
                     seed=_resolve_seed(seed, generator), sample_offset=sample_offset, sample_ids=sample_ids,
                     device=device, backend=backend)


def _check_sample_ids(sample_ids: Optional[torch.Tensor], N: int, seed: Optional[int], sample_offset: int) -> None:
    if sample_ids is None:
        return
    if not isinstance(sample_ids, torch.Tensor):
        raise TypeError(f"sample_ids must be a tensor, got {type(sample_ids).__name__}")
    if sample_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"sample_ids must hold integers (int64, int32, int16, int8 or uint8), got {sample_ids.dtype}")
    if tuple(sample_ids.shape) != (N,):
        raise ValueError(f"sample_ids must be [N] = [{N}], got shape {tuple(sample_ids.shape)}")
    if seed is None:
        raise ValueError("sample_ids only has a meaning together with seed")
    if sample_offset:
        raise ValueError("pass sample_ids or sample_offset, not both")
    if host_checks(sample_ids) and N and int(sample_ids.min()) < 0:
        raise ValueError(f"sample_ids must be >= 0, got {int(sample_ids.min())}")


# ----------------------------------------------------------------------------------------------------- importance


def philox_uniform(N: int, L: int, seed: int, sample_offset: int = 0, device: Device = None,
                   stream: int = _GUMBEL_STREAM) -> torch.Tensor:
    """[N, L] float32 uniforms in (0, 1) from Philox counters (patch, sample low, sample high, stream)."""
    idx = torch.arange(L, dtype=torch.int64, device=device).expand(N, L)
    sample = (torch.arange(N, dtype=torch.int64, device=device) + sample_offset)[:, None].expand(N, L)
    r0, _, _, _ = philox4x32(seed, idx, sample & 0xFFFFFFFF, sample >> 32, torch.full_like(idx, stream))
    # 23 random bits centred in their bin: k + 1/2 < 2^23 is exact in float32, so never 0 or 1 (24 bits plus the
    # half would round the top value up to 1)
    return ((r0 >> 9).to(torch.float32) + 0.5) * 2.0**-23


def seeded_noise(N: int, L: int, seed: int, sample_offset: int = 0, device: Device = None) -> torch.Tensor:
    """[N, L] float32 uniform noise in (0, 1) that is a function of (seed, sample_offset + n, patch) only.

    For code paths that take ``noise=`` (a model's ``forward(imgs, mask_ratio, noise)``): masks then depend on the
    seed and the global sample index, not on the batch split. Generated on ``device`` with integer tensor ops, no
    host sync. 23-bit uniforms: equal values in a row are rare and ordered by patch index.
    """
    if seed is None:
        raise ValueError("seeded_noise needs a seed")
    check_sizes(N, L)
    check_seed(seed, sample_offset, N)
    return philox_uniform(N, L, seed, sample_offset, device, stream=_NOISE_STREAM)


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N, L], got shape {tuple(scores.shape)}")
    if scores.shape[1] == 0:
        raise ValueError("scores must have at least one patch (L > 0)")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if not host_checks(scores):
        return
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise ValueError("scores must be finite and non-negative (they are keep weights)")


def gumbel_top_k_noise(scores: torch.Tensor, temperature: float, u: torch.Tensor) -> torch.Tensor:
    """[N, L] float32 noise whose ascending argsort is a Gumbel-top-k draw with weights scores**(1/temperature),
    from uniforms ``u`` [N, L] strictly inside (0, 1)."""
    gumbel = -torch.log(-torch.log(u))
    # the log in the scores' own range (float64 scores may lie far outside float32's) and shifted so each row's
    # largest is 0: only relative weights matter, and the keys then neither overflow nor lose digits to the scale
    logs = torch.log(scores.to(torch.promote_types(scores.dtype, torch.float32)))
    top = logs.amax(dim=1, keepdim=True)
    logs = logs - torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row of zeros stays -inf
    return -((logs / temperature).to(torch.float32) + gumbel)


def importance_noise(scores: torch.Tensor, temperature: float, seed: int, sample_offset: int = 0) -> torch.Tensor:
    """:func:`gumbel_top_k_noise` with Philox uniforms of (seed, sample_offset + n, patch)."""
    N, L = scores.shape
    return gumbel_top_k_noise(scores, temperature, philox_uniform(N, L, seed, sample_offset, scores.device))


def importance_masking_ref(scores: torch.Tensor, mask_ratio: float, *, temperature: float = 1.0, seed: int = 0,
                           sample_offset: int = 0) -> MaskInfo:
    """Torch implementation of :func:`importance_masking` for a resolved seed."""
    K = num_kept(scores.shape[1], mask_ratio)
    return _masking_from_order(importance_noise(scores, temperature, seed, sample_offset), K)


def _importance_triton(scores: torch.Tensor, mask_ratio: float, *, temperature: float = 1.0, seed: int = 0,
                       sample_offset: int = 0) -> MaskInfo:
    N, L = scores.shape
    noise = importance_noise(scores, temperature, seed, sample_offset)
    return random_masking_kept_triton(N, L, num_kept(L, mask_ratio), noise=noise)


def _importance_reasons(scores, mask_ratio, **_) -> list[str]:
    return triton_masking_reasons(scores.shape[1], None, scores.device)


_importance_op = get_op("importance_masking")
_importance_op.register("torch")(importance_masking_ref)
_importance_op.register("triton", reasons=_importance_reasons)(_importance_triton)


def importance_masking(
    scores: torch.Tensor,
    mask_ratio: float,
    *,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
    backend: Optional[str] = None,
) -> MaskInfo:
    """Score-driven masking: K = int(L * (1 - mask_ratio)) patches kept, drawn without replacement with
    probability proportional to scores**(1 / temperature) (Gumbel-top-k; e.g. pixel variance or attention).

    ``scores`` [N, L] floating, finite, >= 0 (checked for CPU scores, see ``host_checks``). temperature -> 0
    keeps the top-K scores, large temperatures approach uniform random masking; a zero score is kept only when
    fewer than K patches have a positive score (those ties go by patch index). ids_keep is in draw order (highest
    perturbed score first), as random masking's shuffle order. Outputs on the device of ``scores``.

    Equivalent PyTorch::

        g = -torch.log(-torch.log(torch.rand(N, L)))
        ids_shuffle = torch.argsort(-(torch.log(scores) / temperature + g), dim=1, stable=True)
        ids_keep = ids_shuffle[:, :K]; ids_restore = torch.argsort(ids_shuffle, dim=1)
    """
    _check_scores(scores)
    check_mask_ratio(mask_ratio)
    if not is_number(temperature) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    check_seed(seed, sample_offset, scores.shape[0])
    return _importance_op(scores, mask_ratio, temperature=float(temperature), seed=_resolve_seed(seed, generator),
                          sample_offset=sample_offset, backend=backend)


# ------------------------------------------------------------------------------------------------------- schedule


def ratio_schedule(step: int, total_steps: int, start: float, end: float, kind: str = "linear") -> float:
    """Progressive mask ratio at ``step`` of ``total_steps``: from ``start`` (step 0) to ``end`` (step >= total).

    kind "linear": start + (end - start) * t; "cosine": end + (start - end) * (1 + cos(pi * t)) / 2, with
    t = min(step / total_steps, 1). Both ratios must be valid mask ratios ([0, 1)).
    """
    check_mask_ratio(start)
    check_mask_ratio(end)
    if not is_int(total_steps) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not is_int(step) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if kind not in ("linear", "cosine"):
        raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}")
    # the endpoints exactly: start + (end - start) * 1 can miss end by an ulp, and so change K = int(L * (1 - r))
    if step == 0:
        return float(start)
    if step >= total_steps:
        return float(end)
    t = step / total_steps
    if kind == "linear":
        return start + (end - start) * t
    return end + (start - end) * (1.0 + math.cos(math.pi * t)) / 2.0


# --------------------------------------------------------------------------------------------------------- ragged


_RATIOS_TYPE = "mask_ratios must be a 1-D real tensor, NumPy array, list or tuple of numbers"


def ratios_from_numpy(mask_ratios: np.ndarray) -> torch.Tensor:
    """Per-sample ratios given as a NumPy array, as a CPU tensor: a native-order, writable, positively strided copy
    ([N] values: cheap) that torch can wrap; arrays of anything but real numbers raise a TypeError."""
    if mask_ratios.dtype.kind not in "fiu":
        raise TypeError(f"{_RATIOS_TYPE}, got an array of {mask_ratios.dtype}")
    return torch.from_numpy(np.array(mask_ratios, dtype=mask_ratios.dtype.newbyteorder("=")))


def _ragged_counts(N: int, L: int, mask_ratios: Union[torch.Tensor, Sequence[float]]) -> list[int]:
    if isinstance(mask_ratios, np.ndarray):
        mask_ratios = ratios_from_numpy(mask_ratios)
    if isinstance(mask_ratios, torch.Tensor):
        if mask_ratios.dim() != 1:
            raise ValueError(f"mask_ratios must be a 1-D [N] tensor, got shape {tuple(mask_ratios.shape)}")
        if mask_ratios.is_complex() or mask_ratios.dtype == torch.bool:
            raise TypeError(f"{_RATIOS_TYPE}, got a tensor of {mask_ratios.dtype}")
        if mask_ratios.is_floating_point() and torch.isnan(mask_ratios).any():
            raise ValueError("mask_ratios contain NaN")
        values = mask_ratios.detach().cpu()
        if values.dtype == torch.float64:
            ratios = values.tolist()
        else:
            # shortest decimal that rounds to each float32 value (0.3, not 0.30000001192...), so a tensor and a list
            # of the same ratios give the same counts
            ratios = [float(str(v)) for v in values.float().numpy()]
    else:
        if not isinstance(mask_ratios, (list, tuple)) or not all(
                isinstance(r, numbers.Real) and not isinstance(r, bool) for r in mask_ratios):
            raise TypeError(f"{_RATIOS_TYPE}, got {type(mask_ratios).__name__} {mask_ratios!r:.80}")
        # NumPy float32 / float16 scalars as their shortest decimal, as the tensor path above reads them
        ratios = [float(str(r)) if isinstance(r, np.floating) and r.dtype.itemsize < 8 else float(r)
                  for r in mask_ratios]
    if len(ratios) != N:
        raise ValueError(f"mask_ratios must have N = {N} entries, got {len(ratios)}")
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"every mask ratio must be in [0, 1), got {r}")
    return [int(L * (1 - r)) for r in ratios]


def _host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # a blocking copy from pageable memory synchronises the stream; from pinned memory it is queued like a kernel
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _ragged_layout(counts: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    cu = [0]
    for k in counts:
        cu.append(cu[-1] + k)
    num_kept_t = _host_to_device(torch.tensor(counts, dtype=torch.int64), device)
    cu_seqlens = _host_to_device(torch.tensor(cu, dtype=torch.int32), device)
    return num_kept_t, cu_seqlens, cu[-1], max(counts) if counts else 0  # (no default=: torch.compile traces this)


def ragged_random_masking_ref(N: int, L: int, counts: list[int], *, noise: Optional[torch.Tensor] = None,
                              seed: int = 0, sample_offset: int = 0, device: Device = None) -> RaggedMaskInfo:
    """Torch implementation of :func:`ragged_random_masking` for resolved per-sample counts and seed."""
    dev = resolve_device(noise, device)
    keys = noise if noise is not None else random_keys_ref(N, L, seed, sample_offset, dev)
    ids_shuffle = torch.argsort(keys, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    num_kept_t, cu_seqlens, total, max_seqlen = _ragged_layout(counts, dev)
    mask = (ids_restore >= num_kept_t[:, None]).to(torch.float32)
    rows = torch.repeat_interleave(torch.arange(N, device=dev), num_kept_t, output_size=total)
    cols = torch.arange(total, device=dev) - cu_seqlens[:-1].long()[rows]
    return RaggedMaskInfo(ids_shuffle[rows, cols], cu_seqlens, max_seqlen, ids_restore, mask, num_kept_t)


def _ragged_launch(noise: Optional[torch.Tensor], num_kept_t: torch.Tensor, cu_seqlens: torch.Tensor, L: int,
                   total: int, seed: int, sample_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from mimfast.kernels.random_masking import launch_random_masking

    N, device = num_kept_t.shape[0], num_kept_t.device
    ids_keep_packed = _empty((total,), torch.int64, device)
    ids_restore = _empty((N, L), torch.int64, device)
    mask = _empty((N, L), torch.float32, device)
    launch_random_masking(ids_keep_packed, ids_restore, mask, noise=noise, num_keep=num_kept_t,
                          cu_seqlens=cu_seqlens, seed=seed, sample_offset=sample_offset,
                          index_bits=key_index_bits(L))
    return ids_keep_packed, ids_restore, mask


# compiled graphs trace the custom op; eager calls launch directly (nothing to differentiate, and the custom op's
# dispatch costs more host time than the kernel)
_ragged_kernel_op = torch.library.custom_op("mimfast::ragged_random_masking", mutates_args=())(_ragged_launch)


@_ragged_kernel_op.register_fake
def _(noise, num_kept_t, cu_seqlens, L, total, seed, sample_offset):
    N, device = num_kept_t.shape[0], num_kept_t.device
    return (
        torch.empty(total, dtype=torch.int64, device=device),
        torch.empty(N, L, dtype=torch.int64, device=device),
        torch.empty(N, L, dtype=torch.float32, device=device),
    )


def _ragged_triton(N: int, L: int, counts: list[int], *, noise: Optional[torch.Tensor] = None, seed: int = 0,
                   sample_offset: int = 0, device: Device = None) -> RaggedMaskInfo:
    dev = resolve_device(noise, device)
    num_kept_t, cu_seqlens, total, max_seqlen = _ragged_layout(counts, dev)
    launch = _ragged_kernel_op if torch.compiler.is_compiling() else _ragged_launch
    ids_keep_packed, ids_restore, mask = launch(noise, num_kept_t, cu_seqlens, L, total, seed, sample_offset)
    return RaggedMaskInfo(ids_keep_packed, cu_seqlens, max_seqlen, ids_restore, mask, num_kept_t)


def _ragged_reasons(N, L, counts, *, noise=None, device=None, **_) -> list[str]:
    return triton_masking_reasons(L, noise, device)


_ragged_op = get_op("ragged_random_masking")
_ragged_op.register("torch")(ragged_random_masking_ref)
_ragged_op.register("triton", reasons=_ragged_reasons)(_ragged_triton)


def ragged_random_masking(
    N: int,
    L: int,
    mask_ratios: Union[torch.Tensor, Sequence[float]],
    *,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
    device: Device = None,
    backend: Optional[str] = None,
) -> RaggedMaskInfo:
    """Random masking with a ratio per sample, packed for a variable-length encoder (``visible_attention``).

    Sample n keeps K_n = int(L * (1 - mask_ratios[n])) patches (computed on the host in float64; float32 values
    are read as their shortest decimal; a CUDA ``mask_ratios`` tensor is read back once, pass a list to avoid that
    sync): the first K_n of its
    random order, exactly as :func:`~mimfast.ops.random_masking.random_masking` with the same ``noise`` or
    ``seed`` (so with equal ratios, ``ids_keep_packed.view(N, K)`` equals random masking's ids_keep). Returns
    :class:`RaggedMaskInfo` (ids_keep_packed [T], cu_seqlens [N+1] int32, max_seqlen, ids_restore [N, L], mask
    [N, L], num_kept [N]), T = sum K_n.

    Equivalent PyTorch::

        ids_shuffle = torch.argsort(noise, dim=1, stable=True); ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep_packed = torch.cat([ids_shuffle[n, :K[n]] for n in range(N)])
        mask = (ids_restore >= K[:, None]).float()
    """
    check_sizes(N, L)
    check_seed(seed, sample_offset, N)
    counts = _ragged_counts(N, L, mask_ratios)
    if noise is not None:
        if seed is not None:
            raise ValueError("pass either noise or seed, not both")
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (N, L):
            raise ValueError(f"noise must be a [N, L] = [{N}, {L}] tensor, got {getattr(noise, 'shape', noise)!r}")
        if noise.is_floating_point() and host_checks(noise) and torch.isnan(noise).any():
            raise ValueError("noise contains NaN")
        seed = 0
    info = _ragged_op(N, L, counts, noise=noise, seed=_resolve_seed(seed, generator), sample_offset=sample_offset,
                      device=device, backend=backend)
    mark_valid_index(info.ids_restore, L)
    return info
