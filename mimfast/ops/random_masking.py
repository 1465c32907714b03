"""MAE random masking: choose K = int(L * (1 - mask_ratio)) patches to keep per sample, uniformly at random."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from mimfast.backend import get_op

__all__ = ["MaskInfo", "random_masking", "random_masking_ref", "num_kept", "check_mask_ratio"]


class MaskInfo(NamedTuple):
    """Output of every mask generator.

    ids_keep:    [N, K] int64, indices of the kept (visible) patches, in the order the encoder sees them
    ids_restore: [N, L] int64, position of each patch in the (kept, removed) shuffled order
    mask:        [N, L] float, 1 = removed (to reconstruct), 0 = kept
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def check_mask_ratio(mask_ratio: float) -> None:
    if not isinstance(mask_ratio, (int, float)) or isinstance(mask_ratio, bool):
        raise TypeError(f"mask_ratio must be a number, got {type(mask_ratio).__name__}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")


def num_kept(L: int, mask_ratio: float) -> int:
    """K, the number of kept patches: int(L * (1 - mask_ratio)), as in the MAE reference."""
    check_mask_ratio(mask_ratio)
    return int(L * (1 - mask_ratio))


def _check_noise(noise: Optional[torch.Tensor], N: int, L: int) -> None:
    if noise is None:
        return
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a tensor, got {type(noise).__name__}")
    if tuple(noise.shape) != (N, L):
        raise ValueError(f"noise must have shape [N, L] = [{N}, {L}], got {tuple(noise.shape)}")
    if noise.is_floating_point() and torch.isnan(noise).any():
        raise ValueError("noise contains NaN")


def mask_from_keep(ids_keep: torch.Tensor, L: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] kept indices -> [N, L] mask with 1 at removed patches."""
    mask = torch.ones(ids_keep.shape[0], L, dtype=dtype, device=ids_keep.device)
    return mask.scatter_(1, ids_keep, 0.0)


def random_masking_ref(
    N: int,
    L: int,
    mask_ratio: float,
    *,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str, None] = None,
) -> MaskInfo:
    """Reference: ids_shuffle = argsort(noise) ascending, the first K are kept.

    Equivalent PyTorch::

        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :K]
        mask = torch.ones(N, L); mask[:, :K] = 0; mask = torch.gather(mask, 1, ids_restore)
    """
    K = num_kept(L, mask_ratio)
    if noise is None:
        noise = torch.rand(N, L, generator=generator, device=device)
    # stable sort: ties (possible with low-precision noise) resolve by index, the same on every backend
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :K].contiguous()
    return MaskInfo(ids_keep, ids_restore, mask_from_keep(ids_keep, L))


_op = get_op("random_masking")
_op.register("torch")(random_masking_ref)


def random_masking(
    N: int,
    L: int,
    mask_ratio: float,
    *,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str, None] = None,
    backend: Optional[str] = None,
) -> MaskInfo:
    """Per-sample uniform random masking for N samples of L patches.

    Returns :class:`MaskInfo` (ids_keep [N,K], ids_restore [N,L], mask [N,L] with 1 = removed). With ``noise``
    [N,L] the result is exactly the argsort semantics of the MAE reference; without it the randomness is drawn
    on ``device`` from ``generator``.
    """
    if N < 0 or L <= 0:
        raise ValueError(f"need N >= 0 and L > 0, got N={N}, L={L}")
    check_mask_ratio(mask_ratio)
    _check_noise(noise, N, L)
    if noise is not None and device is not None and noise.device.type != torch.device(device).type:
        raise ValueError(f"noise is on {noise.device} but device={device}")
    return _op(N, L, mask_ratio, noise=noise, generator=generator, device=device, backend=backend)
