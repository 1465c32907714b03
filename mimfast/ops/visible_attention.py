"""Softmax attention over the visible tokens of each sample: packed variable-length or dense equal-length.

With per-sample mask ratios every sample keeps its own number of tokens; packing them back to back ([T, H, d]
plus cumulative lengths ``cu_seqlens`` [N+1]) spends no flops or bytes on padding. Attention is non-causal and
never crosses a sequence boundary.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from mimfast.backend import first_order_only, get_op, requested_backend, triton_interpret

__all__ = ["visible_attention", "visible_attention_ref", "check_attention_inputs"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
# CUDA grids allow 65535 blocks along y, where the kernels put the sequences (plus one column for the tail)
MAX_SEQUENCES = 65534


# Device tensors of cu_seqlens already checked, with (version counter, T, max_seqlen) at the time: one batch's
# cu_seqlens goes to every attention layer of the encoder, and each device-side check is a dozen small launches
# (more host time than a short-sequence attention kernel takes on the GPU). An in-place write bumps the version.
_CHECKED: list[tuple[weakref.ref, tuple[int, int, Optional[int]]]] = []
_CHECKED_KEPT = 8


def _check_cu_seqlens(cu_seqlens: torch.Tensor, T: int, max_seqlen: Optional[int], device: torch.device) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (cumulative lengths [N+1]), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [N+1] with N >= 0, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    on_host = cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling()
    remembered = not on_host and not torch.compiler.is_compiling() and not cu_seqlens.is_inference()
    key = (cu_seqlens._version, T, max_seqlen) if remembered else None
    if remembered and any(ref() is cu_seqlens and seen == key for ref, seen in _CHECKED):
        return
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    # messages without the sizes' values: under torch.compile those are symbolic, and formatting them into a
    # string would break the graph; the host path adds them when it raises
    checks = [
        (cu_seqlens[0] == 0, "cu_seqlens[0] must be 0"),
        ((lengths >= 0).all(), "cu_seqlens must be non-decreasing"),
        (cu_seqlens[-1] <= T, "cu_seqlens[-1] must be <= T (rows of q)"),
    ]
    if max_seqlen is not None and lengths.numel():
        checks.append((lengths.max() <= max_seqlen, "every sequence must be at most max_seqlen long"))
    if on_host:
        for ok, msg in checks:
            if not bool(ok):
                raise ValueError(f"{msg}; got cu_seqlens = {cu_seqlens.tolist()}, T = {T}, max_seqlen = "
                                 f"{max_seqlen}")
        return
    # checked on the device (and inside compiled graphs): a host read would stall the stream on every call
    ok = torch.stack([c for c, _ in checks]).all()
    torch._assert_async(ok, "visible_attention: invalid cu_seqlens (" + "; ".join(m for _, m in checks) + ")")
    if remembered:
        _CHECKED.append((weakref.ref(cu_seqlens), key))
        del _CHECKED[:-_CHECKED_KEPT]


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    scale: Optional[float] = None,
) -> None:
    """Raise a clear error unless q, k, v are packed [T, H, d] with valid ``cu_seqlens`` or dense [N, S, H, d].

    On CUDA the value checks of ``cu_seqlens`` (starts at 0, non-decreasing, ends within T, no sequence longer
    than ``max_seqlen``) run as a device-side assertion, without a host synchronisation.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must share a shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if cu_seqlens is None and q.dim() != 4:
        raise ValueError(f"dense q, k, v must be [N, S, H, d] (or pass cu_seqlens for packed [T, H, d]), "
                         f"got shape {tuple(q.shape)}")
    if cu_seqlens is not None and q.dim() != 3:
        raise ValueError(f"packed q, k, v must be [T, H, d] with cu_seqlens, got shape {tuple(q.shape)}")
    if q.shape[-1] < 1:
        raise ValueError("head dim must be at least 1")
    if max_seqlen is not None:
        if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
        if cu_seqlens is None and max_seqlen < q.shape[1]:
            raise ValueError(f"max_seqlen = {max_seqlen} is below the dense sequence length {q.shape[1]}")
    # any real number (NumPy's float32 too), not a bool
    if scale is not None and not (isinstance(scale, numbers.Real) and not isinstance(scale, (bool, np.bool_))
                                  and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen, q.device)


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain softmax attention of [..., S, H, d] inputs, in their dtype."""
    scores = torch.einsum("...qhd,...khd->...hqk", q, k) * scale
    return torch.einsum("...hqk,...khd->...qhd", scores.softmax(dim=-1), v)


def visible_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    scale: Optional[float] = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference: plain softmax attention, one sequence at a time for packed input.

    Computes in the input dtype, or in fp32 with ``upcast`` (fp64 stays fp64); returns the input dtype. Packed
    rows past ``cu_seqlens[-1]`` belong to no sequence: their output is 0. ``max_seqlen`` is accepted for
    signature parity and unused. Reads ``cu_seqlens`` on the host.
    """
    del max_seqlen
    sm_scale = _scale(q, scale)
    dtype = q.dtype
    if upcast and dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    if cu_seqlens is None:
        return _attend(q, k, v, sm_scale).to(dtype)
    bounds = cu_seqlens.tolist()
    pieces = [_attend(q[s:e], k[s:e], v[s:e], sm_scale) for s, e in zip(bounds[:-1], bounds[1:])]
    pieces.append(q.new_zeros((q.shape[0] - bounds[-1],) + tuple(q.shape[1:])))
    return torch.cat(pieces).to(dtype)


def _visible_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    # Dense input goes to SDPA, which picks flash / cuDNN / memory-efficient kernels on CUDA and exact math on
    # CPU; packed input runs the per-sequence reference (a host read of cu_seqlens).
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=_scale(q, scale))
        return out.transpose(1, 2)
    return visible_attention_ref(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale)


# ---------------------------------------------------------------------------------------------------------------
# Triton launchers: they write into caller-provided buffers so tests can poison them first.


def _layout(t: torch.Tensor, packed: bool) -> tuple[int, int, int, int]:
    """(batch, token, head, dim) strides; packed tensors have no batch dimension."""
    return (0,) + tuple(t.stride()) if packed else tuple(t.stride())


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are promised fp32 results: TF32 dots would lose about three decimal digits
    return "ieee" if dtype == torch.float32 else "tf32"


def _geometry(q: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int) -> tuple[int, int, int, int]:
    """(sequences N, dense length S, rows R of the lse buffer, program columns along y)."""
    if cu_seqlens is None:
        N, S = q.shape[0], q.shape[1]
        return N, S, N * S, N
    N = cu_seqlens.numel() - 1
    return N, max_seqlen, q.shape[0], N + 1


def launch_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    max_seqlen: int,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Run the forward kernel: ``out`` (layout of q) and ``lse`` [H, R] fp32 (base-2 log-sum-exp of the scores
    times scale * log2(e)) are overwritten everywhere; packed rows past cu_seqlens[-1] get out = 0 and lse = 0."""
    from mimfast.kernels.visible_attention import _attn_fwd, _attn_fwd_short, fwd_config, short_config

    packed = cu_seqlens is not None
    N, S, R, cols = _geometry(q, cu_seqlens, max_seqlen)
    H, d = q.shape[-2], q.shape[-1]
    if q.numel() == 0 or cols == 0:
        return
    fp32 = q.dtype == torch.float32
    short = short_config(d, max_seqlen, fp32)
    args = (N, S, q.shape[0] if packed else R,
            *_layout(q, packed), *_layout(k, packed), *_layout(v, packed), *_layout(out, packed),
            lse.stride(0), scale)
    if short is not None:
        _attn_fwd_short[(cols, H)](q, k, v, out, lse, cu_seqlens if packed else q, *args, HEAD_DIM=d, PACKED=packed,
                                   DOT_PRECISION=_dot_precision(q.dtype), **short)
        return
    cfg = fwd_config(d, max_seqlen, fp32)
    grid = (max(1, -(-max_seqlen // cfg["BLOCK_M"])), cols, H)
    _attn_fwd[grid](q, k, v, out, lse, cu_seqlens if packed else q, *args, HEAD_DIM=d, PACKED=packed,
                    DOT_PRECISION=_dot_precision(q.dtype), NEG_SCALE=scale < 0, **cfg)


def launch_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    max_seqlen: int,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Run the backward kernels: dq, dk, dv (layouts of q, k, v) are overwritten everywhere, packed tail rows
    with zeros."""
    from mimfast.kernels.visible_attention import (
        _attn_bwd,
        _attn_bwd_delta,
        _attn_bwd_short,
        bwd_config,
        short_config,
    )

    packed = cu_seqlens is not None
    N, S, R, cols = _geometry(q, cu_seqlens, max_seqlen)
    H, d = q.shape[-2], q.shape[-1]
    if q.numel() == 0 or cols == 0:
        return
    fp32 = q.dtype == torch.float32
    cu = cu_seqlens if packed else q
    short = short_config(d, max_seqlen, fp32, backward=True)
    if short is not None:
        # delta = rowsum(P * dP) is computed inside, from the fp32 tiles: one launch, no [H, R] buffer, no read of
        # the output
        _attn_bwd_short[(cols, H)](
            q, k, v, grad_out, lse, dq, dk, dv, cu,
            N, S, q.shape[0] if packed else R,
            *_layout(q, packed), *_layout(k, packed), *_layout(v, packed), *_layout(grad_out, packed),
            *_layout(dq, packed), *_layout(dk, packed), *_layout(dv, packed),
            lse.stride(0), scale,
            HEAD_DIM=d, PACKED=packed, DOT_PRECISION=_dot_precision(q.dtype), **short,
        )
        return
    cfg = bwd_config(d, fp32)
    delta = torch.empty_like(lse)
    if N > 0:
        block_m = 64
        _attn_bwd_delta[(max(1, -(-max_seqlen // block_m)), N, H)](
            out, grad_out, delta, cu, S, *_layout(out, packed), *_layout(grad_out, packed), delta.stride(0),
            HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=block_m, PACKED=packed,
        )
    grid = (max(1, -(-max_seqlen // cfg["BLOCK_OUT"])), cols, H)
    _attn_bwd[grid](
        q, k, v, grad_out, lse, delta, dq, dk, dv, cu,
        N, S, q.shape[0] if packed else R,
        *_layout(q, packed), *_layout(k, packed), *_layout(v, packed), *_layout(grad_out, packed),
        *_layout(dq, packed), *_layout(dk, packed), *_layout(dv, packed),
        lse.stride(0), scale,
        HEAD_DIM=d, PACKED=packed, DOT_PRECISION=_dot_precision(q.dtype), **cfg,
    )


def _lse_shape(q: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> tuple[int, int]:
    rows = q.shape[0] if cu_seqlens is not None else q.shape[0] * q.shape[1]
    return (q.shape[-2], rows)


@torch.library.custom_op("mimfast::visible_attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens), dtype=torch.float32, device=q.device)
    launch_forward(q, k, v, cu_seqlens, max_seqlen, scale, out, lse)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens), dtype=torch.float32)


@torch.library.custom_op("mimfast::visible_attention_bwd", mutates_args=())
def _attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    launch_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dq, dk, dv)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _VisibleAttention(torch.autograd.Function):
    """The eager path: the same launchers without the custom-op dispatch, which costs more host time per call
    than the short-sequence kernels take on the GPU (about 60 us forward and 75 us backward, measured on CPU)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(_lse_shape(q, cu_seqlens), dtype=torch.float32, device=q.device)
        launch_forward(q, k, v, cu_seqlens, max_seqlen, scale, out, lse)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        launch_backward(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, dq, dk, dv)
        return dq, dk, dv, None, None, None


def _visible_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    if max_seqlen is None:
        # an upper bound read from shapes, not values: no host synchronisation, at the price of idle programs
        max_seqlen = q.shape[0] if cu_seqlens is not None else q.shape[1]
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()  # the kernels read it by index, without a stride
    if torch.compiler.is_compiling():
        # the custom op is what compiled graphs trace through without a break
        return _attention_fwd(q, k, v, cu_seqlens, max_seqlen, _scale(q, scale))[0]
    return _VisibleAttention.apply(q, k, v, cu_seqlens, max_seqlen, _scale(q, scale))


def _triton_reasons(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    scale: Optional[float] = None,
) -> list[str]:
    reasons = []
    if q.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and triton_interpret():
        reasons.append("bfloat16 tl.dot is wrong under TRITON_INTERPRET=1: use float16 or float32 on CPU")
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    n_seq = cu_seqlens.numel() - 1 if cu_seqlens is not None else q.shape[0]
    if n_seq > MAX_SEQUENCES:
        reasons.append(f"{n_seq} sequences > {MAX_SEQUENCES} (one grid column each)")
    return reasons


_op = get_op("visible_attention")
_op.register("torch")(_visible_attention_torch)
_op.register("triton", reasons=_triton_reasons)(_visible_attention_triton)


def visible_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Non-causal softmax attention within each sequence; differentiable in q, k, v.

    Packed: q, k, v [T, H, d] with ``cu_seqlens`` [N+1] int32 on q's device (sequence b is rows
    cu_seqlens[b] .. cu_seqlens[b+1]; rows past cu_seqlens[-1] are never read and give output 0). Dense:
    q, k, v [N, S, H, d]. Returns the layout of q. ``scale`` defaults to 1/sqrt(d). ``max_seqlen`` is the
    longest sequence or any upper bound of it; pass it for packed input, or the kernel grid is sized for
    T-long sequences (correct, but most programs idle).

    Backends: ``triton`` runs the fused kernels (fp16/bf16 on CUDA, fp32 too; head dim up to 128, padded to a
    power of two; no host synchronisation; deterministic backward). ``torch`` runs SDPA for dense input (flash
    or cuDNN on CUDA) and the per-sequence reference for packed input. ``auto`` takes triton for packed input on
    CUDA and SDPA for dense input on CUDA (there its host work is lighter and its kernels equal or faster, except
    at 50 tokens where ours take 0.7x its device time: ``python -m benchmarks.bench_attention`` measures both).

    Equivalent PyTorch::

        for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            out[s:e] = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), scale=scale
            ).transpose(0, 1)
    """
    check_attention_inputs(q, k, v, cu_seqlens, max_seqlen, scale)
    if cu_seqlens is None and q.is_cuda and requested_backend(backend) == "auto":
        # Dense equal lengths on CUDA go to SDPA. Measured on H100 (bf16, d 64, 12 heads, N 256 / 32 / 32;
        # benchmarks/results/bench_attention.md, 2026-11-23), fwd + bwd, Triton kernels vs SDPA's best backend:
        # 50 tokens 0.106 vs 0.146 ms of device time but 0.86 vs 0.55 ms of host time per call, 197 tokens 0.83 vs
        # 0.83 ms, 1568 tokens backward 2.36 vs 1.77 ms. Packed input stays on the kernels, which spend nothing on
        # padding. The MAE decoder's head dim 32 (197 tokens, 16 heads) is not yet timed (bench_attention's
        # mae_dec_197 case).
        backend = "torch"
    return _op(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale, backend=backend)
