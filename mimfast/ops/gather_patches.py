"""gather_patches: the kept patches of a batch, [N, K, P], read straight from the images.

Also holds the index checks shared by the ops that take ``ids_keep`` / ``ids_restore``.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch

from mimfast.backend import eager_autograd, get_op
from mimfast.ops.patchify import as_size, check_images, grid_size, patch_dim, patchify, span_reasons

__all__ = ["gather_patches", "gather_patches_ref", "check_index", "mark_valid_index"]


# Index tensors known to hold values in [0, high): id -> (weak reference, version counter, high). The masking ops
# register their outputs, so indices that come straight from them skip the value check (on CUDA four launches,
# about as long on the device as a restore's whole backward pass at small sizes); any in-place change bumps the
# version and brings the check back.
_VALID: dict[int, tuple[weakref.ref, int, int]] = {}
_VALID_KEPT = 64


def mark_valid_index(ids: torch.Tensor, high: int) -> None:
    """Record that ``ids`` (as it is now) holds only values in [0, high), and distinct ones within each row
    wherever its consumers require that (the masking ops' ids_keep and ids_restore)."""
    if torch.compiler.is_compiling() or ids.is_inference():  # inference tensors have no version counter
        return
    _VALID[id(ids)] = (weakref.ref(ids), ids._version, high)
    if len(_VALID) > _VALID_KEPT:
        for key in [k for k, (ref, _, _) in _VALID.items() if ref() is None] or list(_VALID)[: len(_VALID) // 2]:
            del _VALID[key]


def _known_valid(ids: torch.Tensor, high: Optional[int] = None) -> bool:
    """Whether ``ids`` is registered and unchanged since (with ``high``: registered for a bound <= high)."""
    entry = _VALID.get(id(ids))
    return (entry is not None and entry[0]() is ids and not ids.is_inference() and entry[1] == ids._version
            and (high is None or entry[2] <= high))


def check_index(ids: torch.Tensor, N: int, high: int, device: torch.device, name: str,
                dtypes: tuple[torch.dtype, ...] = (torch.int64,)) -> None:
    """Raise unless ``ids`` is an [N, *] tensor of one of ``dtypes`` (int64) on ``device`` with values in
    [0, high).

    The range check needs the values: on CPU it raises a ValueError at once; on other devices it is queued with
    ``torch._assert_async`` so that it costs no host synchronisation (a bad index then fails at the next sync).
    Indices registered by :func:`mark_valid_index` and unchanged since skip the value check.
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d).replace('torch.', '') for d in dtypes)}, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != N:
        raise ValueError(f"{name} must be [N, *] with N = {N}, got shape {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the data is on {device}")
    if ids.numel() == 0 or (not torch.compiler.is_compiling() and _known_valid(ids, high)):
        return
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(ids)
        if lo.item() < 0 or hi.item() >= high:
            raise ValueError(f"{name} values must be in [0, {high}), got min {lo.item()} and max {hi.item()}")
    else:
        # an index is in range exactly when clamping leaves it unchanged: three launches and the assert
        torch._assert_async(ids.clamp(0, high - 1).eq_(ids).all(), f"{name} values must be in [0, {high})")


def check_distinct(ids: torch.Tensor, name: str) -> None:
    """Raise unless no row of the [N, *] index ``ids`` (checked by :func:`check_index`) holds a value twice. A sort
    per row on CPU; on a device it stays the caller's promise (the masking ops' outputs keep it)."""
    if (ids.shape[1] < 2 or ids.device.type != "cpu" or torch.compiler.is_compiling()
            or _known_valid(ids)):
        return
    repeats = (ids.sort(dim=1).values.diff(dim=1) == 0).any(dim=1)
    if repeats.any():
        raise ValueError(f"{name} must not repeat a value within a sample; sample {int(repeats.nonzero()[0, 0])} does")


def gather_patches_ref(
    imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, tubelet_size: Optional[int] = None
) -> torch.Tensor:
    """Reference: patchify all L patches, then gather the kept rows.

    Equivalent PyTorch::

        x = patchify(imgs, p)                                    # [N, L, P]
        out = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))   # [N, K, P]
    """
    x = patchify(imgs, patch_size, tubelet_size)
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _check(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, tubelet_size: Optional[int]) -> None:
    check_images(imgs, patch_size, tubelet_size)
    L = 1
    for g in grid_size(imgs.shape, patch_size, tubelet_size):
        L *= g
    check_index(ids_keep, imgs.shape[0], L, imgs.device, "ids_keep")
    if ids_keep.shape[1] > L:
        raise ValueError(f"ids_keep keeps {ids_keep.shape[1]} patches of {L}")
    check_distinct(ids_keep, "ids_keep")


def _as_video(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, 1, H, W] view, so images and videos share one kernel."""
    return x.unsqueeze(2) if x.dim() == 4 else x


def _launch(kernel, src: torch.Tensor, ids_keep: torch.Tensor, dst: torch.Tensor, image: torch.Tensor,
            patch_size: int, tubelet: int) -> None:
    from mimfast.kernels.gather_patches import tile_config

    N, C, T, H, W = image.shape
    K = ids_keep.shape[1]
    programs, cfg = tile_config(C, patch_dim(1, patch_size, tubelet), N * K, image.stride(-1) == 1)
    kernel[(programs,)](src, ids_keep, dst, N * K, K, H // patch_size, W // patch_size, *image.stride(),
                        C=C, PT=tubelet, PS=patch_size, **cfg)


def gather_rows(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, tubelet_size: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The kept patches [N, K, P] in ``dtype`` (the kernel converts as it stores: no copy in the images' dtype)."""
    from mimfast.kernels.gather_patches import gather_patches_fwd_kernel

    x = _as_video(imgs)
    N, C = x.shape[:2]
    K = ids_keep.shape[1]
    out = torch.empty(N, K, patch_dim(C, patch_size, tubelet_size), dtype=dtype, device=imgs.device)
    if out.numel():
        _launch(gather_patches_fwd_kernel, x, ids_keep.contiguous(), out, x, patch_size, tubelet_size)
    return out


def _forward(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    return gather_rows(imgs, ids_keep, patch_size, tubelet_size, imgs.dtype)


_gather_patches_op = torch.library.custom_op("mimfast::gather_patches", mutates_args=())(_forward)


@_gather_patches_op.register_fake
def _(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], patch_dim(imgs.shape[1], patch_size, tubelet_size))


def _backward_grad(grad: torch.Tensor, ids_keep: torch.Tensor, shape: list[int], patch_size: int,
                   tubelet_size: int) -> torch.Tensor:
    """Scatter [N, K, P] patch gradients into a zero image of ``shape``; each pixel is in at most one kept patch
    (ids_keep has distinct entries per sample), so every write is the only one and the result is deterministic."""
    from mimfast.kernels.gather_patches import gather_patches_bwd_kernel

    gx = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
    if grad.numel():
        g5 = _as_video(gx)
        _launch(gather_patches_bwd_kernel, grad.contiguous(), ids_keep.contiguous(), g5, g5, patch_size, tubelet_size)
    return gx


_gather_patches_backward_op = torch.library.custom_op("mimfast::gather_patches_backward", mutates_args=())(
    _backward_grad)


@_gather_patches_backward_op.register_fake
def _(grad: torch.Tensor, ids_keep: torch.Tensor, shape: list[int], patch_size: int,
      tubelet_size: int) -> torch.Tensor:
    return grad.new_empty(shape)


def _setup(ctx, inputs, output) -> None:
    imgs, ids_keep, patch_size, tubelet_size = inputs
    ctx.save_for_backward(ids_keep)
    ctx.meta = (list(imgs.shape), patch_size, tubelet_size)


def _backward(ctx, grad: torch.Tensor, scatter: Callable[..., torch.Tensor]):
    (ids_keep,) = ctx.saved_tensors
    shape, patch_size, tubelet_size = ctx.meta
    gx = None
    if ctx.needs_input_grad[0]:
        gx = scatter(grad, ids_keep, shape, patch_size, tubelet_size)
    return gx, None, None, None


_gather_patches_op.register_autograd(lambda ctx, grad: _backward(ctx, grad, torch.ops.mimfast.gather_patches_backward),
                                     setup_context=_setup)


_GatherPatches = eager_autograd("_GatherPatches", _forward, _setup,
                                lambda ctx, grad: _backward(ctx, grad, _backward_grad))


def _triton_reasons(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                    tubelet_size: Optional[int] = None) -> list[str]:
    reasons = []
    if imgs.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"gather_patches kernel supports float16/bfloat16/float32 images, got {imgs.dtype}")
    if ids_keep.numel() >= 2**31:
        reasons.append(f"gather_patches kernel needs N*K < 2^31, got {ids_keep.numel()}")
    return reasons + span_reasons({"imgs": imgs}, patch_size, tubelet_size)


_op = get_op("gather_patches")
_op.register("torch")(gather_patches_ref)


@_op.register("triton", reasons=_triton_reasons)
def _gather_patches_triton(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                           tubelet_size: Optional[int] = None) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.mimfast.gather_patches(imgs, ids_keep, patch_size, tubelet_size or 1)
    return _GatherPatches.apply(imgs, ids_keep, patch_size, tubelet_size or 1)


def gather_patches(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    patch_size: int,
    tubelet_size: Optional[int] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Kept patches of images [N, C, H, W] (or videos [N, C, T, H, W] with ``tubelet_size``): [N, K, P].

    ids_keep: [N, K] int64 patch indices in [0, L), distinct within a sample (as masking produces them); row k of
    the output is patch ids_keep[n, k], its values in (row, col, channel) order (video: (t, row, col, channel)).
    The triton kernel reads only the kept patches; it never builds all L of them. Differentiable in ``imgs``.

    Equivalent PyTorch::

        torch.gather(patchify(imgs, p), 1, ids_keep[..., None].expand(-1, -1, P))
    """
    patch_size, tubelet_size = as_size(patch_size), as_size(tubelet_size)
    _check(imgs, ids_keep, patch_size, tubelet_size)
    return _op(imgs, ids_keep, patch_size, tubelet_size, backend=backend)
