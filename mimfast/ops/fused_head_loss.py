"""MAE prediction head fused with the pixel loss: decoder features -> ``decoder_pred`` linear -> masked pixel
loss, computed chunk by chunk on the masked rows only, so the [N, L, P] prediction is never materialised.

Per chunk of whole samples (as few, equal chunks as ``chunk_size`` allows; the default takes an MAE ViT-B/L/H
batch of 256 in one): copy the masked rows of ``hidden`` once (one row-index copy), one GEMM in the input dtype
(fp32 accumulation) for their predictions, the fused pixel-loss kernel overwrites the predictions with
d(loss)/d(pred) in place, then the weight gradient GEMM reads the copied rows and the hidden gradient GEMM writes
over them (or straight into the hidden gradient when every row is scored), and one row-index copy puts those rows
in place. Across chunks the weight and bias gradients accumulate in fp32 in chunk order, so the result is
deterministic. Every gradient is ready at the end of the forward pass; the backward pass only scales them by the
incoming gradient (in place, and not at all when it is 1).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from mimfast.backend import first_order_only, get_op
from mimfast.ops.gather_patches import check_distinct, mark_valid_index
from mimfast.ops.masked_pixel_loss import (
    KERNEL_DTYPES,
    NORM_NONE,
    NORM_PATCH,
    as_weights,
    check_pixel_loss_args,
    masked_pixel_loss_ref,
    pixel_loss_triton_reasons,
    scale_saved_grad,
)
from mimfast.ops.patchify import as_size, grid_size

__all__ = ["fused_head_masked_pixel_loss", "fused_head_masked_pixel_loss_ref", "masked_ids_from_restore"]

# Rows per chunk. Every chunk costs a dozen more launches, and on an H100 (bf16, MAE ViT-B decoder, batch 256,
# benchmarks/results/bench_loss.md at f1d6b9a) two chunks took 2.08 ms and 242 MB, one chunk 1.51 ms and 275 MB, the
# nn.Linear + reference loss 1.84 ms and 592 MB. 65536 keeps ViT-B/L/H batches of 256 (37632 to 49152 masked rows,
# 2.5 KB of working buffers a row in bf16 for D = 512, P = 768) in one chunk and splits VideoMAE-B batches of 64.
DEFAULT_CHUNK_ROWS = 65536


def masked_ids_from_restore(ids_restore: torch.Tensor, num_kept: int) -> torch.Tensor:
    """[N, L] ids_restore -> [N, L - K] indices of the removed patches, in the shuffled order MAE uses
    (ids_shuffle[:, K:]); the inverse permutation is one scatter, no sort, no host synchronisation."""
    N, L = ids_restore.shape
    # zeros, not empty: were ids_restore no permutation, the entries no one writes still hold a valid index
    ids_shuffle = torch.zeros_like(ids_restore)
    ids_shuffle.scatter_(1, ids_restore, torch.arange(L, device=ids_restore.device).expand(N, L))
    ids = ids_shuffle[:, num_kept:]
    mark_valid_index(ids, L)  # every value is in [0, L) (the scatter itself fails on an index out of range)
    return ids


def _row_view(hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(hidden [N, L, D] as a [rows, D] tensor, rows per sample in it (> 0)): row n * step + l is hidden[n, l]. A
    view when D is contiguous and the sample stride is a positive multiple of the row stride (any sample stride
    for one sample); a contiguous copy otherwise (e.g. a batch broadcast with stride 0)."""
    N, L, D = hidden.shape
    s_n, s_l, s_d = hidden.stride()
    if s_d == 1 and s_l >= D and N > 0 and L > 0:
        if N == 1:
            return hidden.as_strided((L, D), (s_l, 1)), L
        if s_n > 0 and s_n % s_l == 0:
            step = s_n // s_l
            return hidden.as_strided(((N - 1) * step + L, D), (s_l, 1)), step
    return hidden.contiguous().view(N * L, D), L


def _rows(hidden: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
    if ids is None:
        return hidden
    return hidden.gather(1, ids.long()[..., None].expand(-1, -1, hidden.shape[-1]))


def fused_head_masked_pixel_loss_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    imgs: torch.Tensor,
    mask: Optional[torch.Tensor],
    patch_size: int,
    *,
    ids_masked: Optional[torch.Tensor] = None,
    norm_pix: bool = False,
    kind: str = "mse",
    eps: float = 1e-6,
    tubelet_size: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`fused_head_masked_pixel_loss` (``chunk_size`` is ignored).

    Equivalent PyTorch::

        pred = F.linear(hidden, weight, bias)          # [N, L, P] (only the ids_masked rows when given)
        loss = masked_pixel_loss_ref(pred, imgs, mask, p, norm_pix=norm_pix, kind=kind, ids_masked=ids_masked)
    """
    pred = F.linear(_rows(hidden, ids_masked), weight, bias)
    return masked_pixel_loss_ref(pred, imgs, mask, patch_size, norm_pix=norm_pix, kind=kind, eps=eps,
                                 ids_masked=ids_masked, tubelet_size=tubelet_size)


def fused_head_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    imgs: torch.Tensor,
    mask: Optional[torch.Tensor],
    ids: Optional[torch.Tensor],
    patch_size: int,
    tubelet_size: int,
    norm: int,
    l1: bool,
    eps: float,
    chunk_rows: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(loss, grad_hidden [N,L,D], grad_weight [P,D], grad_bias [P]); the gradients are None without
    ``compute_grad`` (grad_bias also without bias)."""
    from mimfast.kernels.pixel_loss import launch_loss_finalize, launch_pixel_loss, launch_weight_sums, num_partials

    N, L, D = hidden.shape
    P = weight.shape[0]
    R = L if ids is None else ids.shape[1]
    wparts = None if mask is None else launch_weight_sums(mask, ids, R)
    # as few chunks as chunk_rows allows, of equal numbers of whole samples
    chunks = 0 if N * R == 0 else -(-N // max(1, chunk_rows // max(R, 1)))
    # no chunk at all when there is no row: the loss is 0 and the gradients are zeros
    per_chunk = -(-N // chunks) if chunks else N
    bounds = [(n0, min(N, n0 + per_chunk)) for n0 in range(0, N, per_chunk)] if chunks else []
    offsets = [0]
    for n0, n1 in bounds:
        offsets.append(offsets[-1] + num_partials((n1 - n0) * R, P, norm))
    partials = torch.empty(offsets[-1], dtype=torch.float32, device=hidden.device)
    grad_hidden = grad_w = grad_b = None
    if compute_grad:
        # rows that are not scored get a zero gradient; with every row scored the GEMMs write all of it
        alloc = torch.zeros if ids is not None else torch.empty
        grad_hidden = alloc(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    if ids is not None:
        # flat row indices: hidden seen as [rows, D] (a view when its rows are evenly strided, as the decoder's
        # output without its cls row is), the gradient as the contiguous [N * L, D] it is
        src, step = _row_view(hidden)
        src_rows = (ids + torch.arange(0, N * step, step, device=ids.device)[:, None]).reshape(-1)
        dst_rows = src_rows if step == L else (ids + torch.arange(0, N * L, L, device=ids.device)[:, None]).reshape(-1)
        if compute_grad:
            grad_flat = grad_hidden.view(N * L, D)
    whole = len(bounds) == 1  # one chunk takes the tensors as they are: no slicing ops

    def part(t: Optional[torch.Tensor], lo: int, hi: int) -> Optional[torch.Tensor]:
        return t if t is None or whole else t[lo:hi]

    for k, (n0, n1) in enumerate(bounds):
        r0, r1 = n0 * R, n1 * R
        chunk_ids = part(ids, n0, n1)
        h = part(hidden, n0, n1).reshape(-1, D) if ids is None else src.index_select(0, part(src_rows, r0, r1))
        buf = F.linear(h, weight, bias).view(n1 - n0, R, P)
        launch_pixel_loss(buf, part(imgs, n0, n1), chunk_ids, part(mask, n0, n1), wparts, N * R,
                          part(partials, offsets[k], offsets[k + 1]), buf if compute_grad else None, patch_size,
                          tubelet_size, norm, l1, eps)
        if not compute_grad:
            continue
        grad_pred = buf.view(-1, P)
        part_w = grad_pred.t() @ h
        if whole:
            # the sum accumulates in fp32 and rounds once to the bias dtype: no separate cast
            grad_w, grad_b = part_w, grad_pred.sum(0) if bias is not None else None
        else:
            part_b = grad_pred.sum(0, dtype=torch.float32) if bias is not None else None
            if k == 0:
                grad_w, grad_b = part_w.float(), part_b
            else:
                grad_w.add_(part_w)
                if bias is not None:
                    grad_b.add_(part_b)
        if chunk_ids is None:
            torch.mm(grad_pred, weight, out=part(grad_hidden, n0, n1).view(-1, D))
        else:
            # the copied rows are not needed any more: their buffer takes the rows' gradient (ids are distinct per
            # sample, so every gradient row is written once)
            torch.mm(grad_pred, weight, out=h)
            grad_flat.index_copy_(0, part(dst_rows, r0, r1), h)
    loss = launch_loss_finalize(partials, wparts, N * R, P, torch.promote_types(hidden.dtype, imgs.dtype))
    if not compute_grad:
        return loss, None, None, None
    if grad_w is None:  # no row at all
        grad_w = torch.zeros_like(weight)
        grad_b = torch.zeros_like(bias) if bias is not None else None
    return loss, grad_hidden, grad_w.to(weight.dtype), None if bias is None else grad_b.to(bias.dtype)


class _FusedHead(torch.autograd.Function):
    """Eager autograd (see ``_PixelLoss`` in :mod:`mimfast.ops.masked_pixel_loss`: the custom op's dispatcher
    round trip is kept for ``torch.compile``)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *rest: Any):
        loss, grad_hidden, grad_w, grad_b = fused_head_forward(hidden, weight, bias, *rest, True)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(grad_hidden, grad_w, *([grad_b] if bias is not None else []))
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple:
        grad_hidden, grad_w, *grad_b = ctx.saved_tensors
        return (scale_saved_grad(grad_hidden, grad_loss), grad_w * grad_loss,
                grad_b[0] * grad_loss if ctx.has_bias else None) + (None,) * 10


@torch.library.custom_op("mimfast::fused_head_pixel_loss", mutates_args=())
def fused_head_pixel_loss_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    imgs: torch.Tensor,
    mask: Optional[torch.Tensor],
    ids: Optional[torch.Tensor],
    patch_size: int,
    tubelet_size: int,
    norm: int,
    l1: bool,
    eps: float,
    chunk_rows: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden [N,L,D], grad_weight [P,D], grad_bias [P]); the gradients are empty without
    ``compute_grad`` (grad_bias also without bias)."""
    loss, *grads = fused_head_forward(hidden, weight, bias, imgs, mask, ids, patch_size, tubelet_size, norm, l1, eps,
                                      chunk_rows, compute_grad)
    return (loss,) + tuple(g if g is not None else hidden.new_empty((0,)) for g in grads)


@fused_head_pixel_loss_op.register_fake
def _fused_head_fake(hidden, weight, bias, imgs, mask, ids, patch_size, tubelet_size, norm, l1, eps, chunk_rows,
                     compute_grad):
    loss = hidden.new_empty((), dtype=torch.promote_types(hidden.dtype, imgs.dtype))
    if not compute_grad:
        return loss, hidden.new_empty((0,)), hidden.new_empty((0,)), hidden.new_empty((0,))
    grad_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    return loss, torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device), torch.empty_like(weight), \
        grad_bias


def _fused_head_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(*output[1:])


def _fused_head_backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple:
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    return (grad_hidden * grad_loss, grad_weight * grad_loss, grad_bias * grad_loss if ctx.has_bias else None) \
        + (None,) * 10


fused_head_pixel_loss_op.register_autograd(_fused_head_backward, setup_context=_fused_head_setup)


def _fused_head_triton(hidden, weight, bias, imgs, mask, patch_size, *, ids_masked=None, norm_pix=False,
                       kind="mse", eps=1e-6, tubelet_size=None, chunk_size=DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # as autocast runs nn.Linear: its operands cast (differentiably) to the autocast dtype; then the GEMMs and
        # the loss run on those, with autocast off so that every buffer keeps one dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _fused_head_triton(hidden, weight, bias, imgs, mask, patch_size, ids_masked=ids_masked,
                                      norm_pix=norm_pix, kind=kind, eps=eps, tubelet_size=tubelet_size,
                                      chunk_size=chunk_size)
    params = [t for t in (hidden, weight, bias) if t is not None]
    compute_grad = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    args = (imgs, mask, ids_masked, patch_size, tubelet_size or 1, NORM_PATCH if norm_pix else NORM_NONE,
            kind == "l1", float(eps), int(chunk_size))
    if torch.compiler.is_compiling():
        return fused_head_pixel_loss_op(hidden, weight, bias, *args, compute_grad)[0]
    if compute_grad:
        return _FusedHead.apply(hidden, weight, bias, *args)
    return fused_head_forward(hidden, weight, bias, *args, False)[0]


def _fused_head_reasons(hidden, weight, bias, imgs, mask, patch_size, *, tubelet_size=None, **_: Any) -> list[str]:
    reasons = []
    if hidden.dtype not in KERNEL_DTYPES:
        reasons.append(f"hidden dtype {hidden.dtype} is not one of fp16/bf16/fp32 (use backend='torch')")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        reasons.append(f"weight/bias dtypes differ from hidden's {hidden.dtype}")
    pred_like = torch.empty(0, dtype=hidden.dtype, device="meta")
    return reasons + [r for r in pixel_loss_triton_reasons(pred_like, imgs, mask, patch_size, tubelet_size)
                      if not r.startswith("pred dtype")]


_op = get_op("fused_head_masked_pixel_loss")
_op.register("torch")(fused_head_masked_pixel_loss_ref)
_op.register("triton", reasons=_fused_head_reasons)(_fused_head_triton)


def fused_head_masked_pixel_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    imgs: torch.Tensor,
    mask: Optional[torch.Tensor],
    patch_size: int,
    *,
    ids_masked: Optional[torch.Tensor] = None,
    norm_pix: bool = False,
    kind: str = "mse",
    eps: float = 1e-6,
    tubelet_size: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    return_pred: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """MAE loss straight from the decoder features: ``masked_pixel_loss(F.linear(hidden, weight, bias), ...)``
    without the [N, L, P] prediction.

    hidden: [N, L, D] decoder_norm output without the cls row; weight [P, D], bias [P] or None (decoder_pred).
    imgs, mask, norm_pix, kind, eps, tubelet_size: as in :func:`~mimfast.ops.masked_pixel_loss`. With
    ``ids_masked`` [N, R] (distinct within a sample) only those rows are projected and scored (mask may then be
    None: every row weighs 1);
    without it all L rows are, weighted by ``mask``. ``chunk_size``: rows per chunk, rounded down to whole
    samples (at least one). Gradients flow to hidden, weight and bias (not to imgs or mask).

    ``return_pred=True`` also returns the full prediction [N, L, P] = F.linear(hidden, weight, bias), detached
    (for visualisation; it costs the GEMM and the memory the fused loss saves).
    Equivalent PyTorch: see :func:`fused_head_masked_pixel_loss_ref`.
    """
    patch_size, tubelet_size = as_size(patch_size), as_size(tubelet_size)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, L, D], got {getattr(hidden, 'shape', type(hidden))}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2] or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(f"weight must be [P, D={hidden.shape[2]}] and bias [P], got {tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    rows = hidden.shape[1] if ids_masked is None else ids_masked.shape[1]
    pred_shape = torch.empty((hidden.shape[0], rows, weight.shape[0]), device="meta")
    if ids_masked is not None and ids_masked.shape[0] != hidden.shape[0]:
        raise ValueError(f"ids_masked must be [N={hidden.shape[0]}, R], got {tuple(ids_masked.shape)}")
    check_pixel_loss_args(pred_shape, imgs, mask, patch_size, ids_masked, tubelet_size, kind, eps)
    if ids_masked is not None:
        check_distinct(ids_masked, "ids_masked")  # each row's gradient is written back once
    L = math.prod(grid_size(imgs.shape, patch_size, tubelet_size))
    if hidden.shape[1] != L:  # (without ids_masked the check above already compared pred's rows with L)
        raise ValueError(f"hidden must be [N, L, D] with one row per patch (L = {L}, no cls row), got "
                         f"{tuple(hidden.shape)}")
    loss = _op(hidden, weight, bias, imgs, as_weights(mask), patch_size, ids_masked=ids_masked, norm_pix=norm_pix,
               kind=kind, eps=eps, tubelet_size=tubelet_size, chunk_size=chunk_size, backend=backend)
    if not return_pred:
        return loss
    with torch.no_grad():
        return loss, F.linear(hidden, weight, bias)
