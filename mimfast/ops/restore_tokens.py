"""restore_tokens: the MAE decoder input, visible tokens put back at their positions and mask tokens elsewhere."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from mimfast.backend import eager_autograd, get_op
from mimfast.kernels.sizes import sm_count
from mimfast.ops.gather_patches import check_distinct, check_index

__all__ = ["restore_tokens", "restore_tokens_ref"]


def restore_tokens_ref(
    x_vis: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
    *,
    has_cls: bool = True,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference, as the MAE decoder writes it (``upcast``: compute in fp32, return the result dtype).

    Equivalent PyTorch::

        mask_tokens = mask_token.repeat(N, L - K, 1)
        x_ = torch.cat([x_vis[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, D))
        x = torch.cat([x_vis[:, :1], x_], dim=1) + pos_embed
    """
    off = 1 if has_cls else 0
    N, L = ids_restore.shape
    D = x_vis.shape[-1]
    K = x_vis.shape[1] - off
    dtype = _out_dtype(x_vis, mask_token, pos_embed)
    if upcast:
        x_vis = x_vis.float()
        mask_token = mask_token.float()
        pos_embed = None if pos_embed is None else pos_embed.float()
    tokens = torch.cat([x_vis[:, off:], mask_token.reshape(1, 1, D).expand(N, L - K, D)], dim=1)
    x = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    if has_cls:
        x = torch.cat([x_vis[:, :1], x], dim=1)
    if pos_embed is not None:
        x = x + pos_embed
    return x.to(dtype)


def _out_dtype(x_vis: torch.Tensor, mask_token: torch.Tensor, pos_embed: Optional[torch.Tensor]) -> torch.dtype:
    # the reference concatenates and adds, so the result takes torch's promoted dtype (fp32 when a bf16 x_vis
    # meets fp32 parameters under autocast, as in the MAE decoder)
    dtype = torch.promote_types(x_vis.dtype, mask_token.dtype)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


def _check(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
           pos_embed: Optional[torch.Tensor], has_cls: bool) -> None:
    for name, t in (("x_vis", x_vis), ("mask_token", mask_token)) + ((("pos_embed", pos_embed),) if
                                                                     pos_embed is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != x_vis.device:
            raise ValueError(f"{name} is on {t.device} but x_vis is on {x_vis.device}")
    off = 1 if has_cls else 0
    if x_vis.dim() != 3 or x_vis.shape[1] < off:
        layout = "[N, 1 + K, D] (cls row first)" if has_cls else "[N, K, D]"
        raise ValueError(f"x_vis must be {layout}, got shape {tuple(x_vis.shape)}")
    N, _, D = x_vis.shape
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dim() != 2:
        raise ValueError("ids_restore must be a [N, L] tensor")
    L = ids_restore.shape[1]
    check_index(ids_restore, N, L, x_vis.device, "ids_restore")
    check_distinct(ids_restore, "ids_restore")  # L distinct values in [0, L): a permutation
    K = x_vis.shape[1] - off
    if K > L:
        raise ValueError(f"x_vis has {K} visible tokens but ids_restore only {L} positions")
    if tuple(mask_token.shape) != (1, 1, D):
        raise ValueError(f"mask_token must be [1, 1, D] = [1, 1, {D}], got {tuple(mask_token.shape)}")
    if pos_embed is not None and tuple(pos_embed.shape) != (1, off + L, D):
        raise ValueError(f"pos_embed must be [1, {'1 + ' if has_cls else ''}L, D] = [1, {off + L}, {D}], "
                         f"got {tuple(pos_embed.shape)}")


# programs per SM of the common backward (each walks its share of the row tiles; see kernels.restore_tokens)
BWD_PROGRAMS_PER_SM = 3


def _forward(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
             pos_embed: Optional[torch.Tensor], has_cls: bool) -> torch.Tensor:
    """Launch the forward kernel: [N, OFF + K, D] -> [N, OFF + L, D]."""
    from mimfast.kernels.restore_tokens import flat_config, restore_tokens_fwd_kernel

    N, L = ids_restore.shape
    D = x_vis.shape[-1]
    off = int(has_cls)
    out = torch.empty(N, off + L, D, dtype=_out_dtype(x_vis, mask_token, pos_embed), device=x_vis.device)
    if out.numel() == 0:
        return out
    cfg = flat_config(D)
    ids = ids_restore.contiguous()
    pos = pos_embed.reshape(off + L, D).contiguous() if pos_embed is not None else out
    NR = N * (off + L)
    restore_tokens_fwd_kernel[(-(-NR // cfg["BLOCK_R"]), -(-D // cfg["BLOCK_D"]))](
        x_vis, ids, mask_token.reshape(D).contiguous(), pos, out, NR, L, x_vis.shape[1] - off, D,
        *x_vis.stride(), ids.stride(0), HAS_CLS=has_cls, HAS_POS=pos_embed is not None, **cfg)
    return out


def _backward_grads(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int, has_cls: bool,
                    x_dtype: torch.dtype, pos_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x_vis [N, OFF + K, D] in x_dtype, grad mask token [D] fp32, grad pos [OFF + L, D] fp32 or empty).

    One pass over ``grad``: visible rows go back to x_vis (ids_restore is a permutation, so each x_vis row is
    written once), masked rows are summed in per-program fp32 partials that a second pass adds up in a fixed order.
    Without a pos_embed gradient the programs are flat row tiles; with one, each program owns a block of positions
    and sums them over a chunk of the batch.
    """
    from mimfast.kernels import restore_tokens as kernels

    N, L = ids_restore.shape
    off = int(has_cls)
    D = grad.shape[-1]
    R = off + L
    gx = torch.empty(N, off + num_visible, D, dtype=x_dtype, device=grad.device)
    if N * R == 0 or D == 0:
        return gx.zero_(), grad.new_zeros(D, dtype=torch.float32), grad.new_zeros(R if pos_grad else 0, D,
                                                                                dtype=torch.float32)
    g = grad.contiguous()
    ids = ids_restore.contiguous()
    if not pos_grad:
        cfg = kernels.flat_config(D)
        n_dt = -(-D // cfg["BLOCK_D"])
        # enough programs for BWD_PROGRAMS_PER_SM on every SM, none without a tile
        progs = max(1, min(-(-N * R // cfg["BLOCK_R"]), -(-BWD_PROGRAMS_PER_SM * sm_count(grad.device) // n_dt)))
        part_mt = torch.empty(progs, D, dtype=torch.float32, device=grad.device)
        kernels.restore_tokens_bwd_kernel[(progs, n_dt)](
            g, ids, gx, part_mt, N * R, L, num_visible, D, ids.stride(0), HAS_CLS=has_cls,
            PREFETCH=kernels.BWD_PREFETCH, **cfg)
        return gx, part_mt.sum(0), grad.new_empty(0, D, dtype=torch.float32)
    cfg = kernels.pos_config(R, D)
    n_rb, n_db = -(-R // cfg["BLOCK_R"]), -(-D // cfg["BLOCK_D"])
    # split the batch as far as needed to give every SM four programs: each program walks its chunk serially, and
    # every chunk costs one [OFF + L, D] fp32 partial to add up
    chunks = max(1, min(N, -(-4 * sm_count(grad.device) // (n_rb * n_db))))
    n_per = -(-N // chunks)
    chunks = -(-N // n_per)
    part_mt = torch.empty(chunks, n_rb, D, dtype=torch.float32, device=grad.device)
    part_pos = torch.empty(chunks, R, D, dtype=torch.float32, device=grad.device)
    kernels.restore_tokens_bwd_pos_kernel[(n_rb, n_db, chunks)](
        g, ids, gx, part_mt, part_pos, N, L, num_visible, D, n_per, ids.stride(0), HAS_CLS=has_cls, **cfg)
    return gx, part_mt.sum((0, 1)), part_pos.sum(0)


@torch.library.custom_op("mimfast::restore_tokens", mutates_args=())
def _restore_tokens_op(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                       pos_embed: Optional[torch.Tensor], has_cls: bool) -> torch.Tensor:
    return _forward(x_vis, ids_restore, mask_token, pos_embed, has_cls)


@_restore_tokens_op.register_fake
def _(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
      pos_embed: Optional[torch.Tensor], has_cls: bool) -> torch.Tensor:
    N, L = ids_restore.shape
    return x_vis.new_empty(N, int(has_cls) + L, x_vis.shape[-1], dtype=_out_dtype(x_vis, mask_token, pos_embed))


@torch.library.custom_op("mimfast::restore_tokens_backward", mutates_args=())
def _restore_tokens_backward_op(
    grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int, has_cls: bool, x_dtype: torch.dtype,
    pos_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_grads(grad, ids_restore, num_visible, has_cls, x_dtype, pos_grad)


@_restore_tokens_backward_op.register_fake
def _(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int, has_cls: bool, x_dtype: torch.dtype,
      pos_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, L = ids_restore.shape
    off = int(has_cls)
    D = grad.shape[-1]
    return (grad.new_empty(N, off + num_visible, D, dtype=x_dtype), grad.new_empty(D, dtype=torch.float32),
            grad.new_empty(off + L if pos_grad else 0, D, dtype=torch.float32))


def _setup(ctx, inputs, output) -> None:
    x_vis, ids_restore, mask_token, pos_embed, has_cls = inputs
    ctx.save_for_backward(ids_restore)
    ctx.meta = (x_vis.shape[1] - int(has_cls), has_cls, x_vis.dtype, mask_token.dtype,
                None if pos_embed is None else pos_embed.dtype)


def _input_grads(ctx, grad: torch.Tensor, backward: Callable[..., tuple[torch.Tensor, ...]]) -> tuple:
    (ids_restore,) = ctx.saved_tensors
    num_visible, has_cls, x_dtype, mt_dtype, pos_dtype = ctx.meta
    pos_grad = pos_dtype is not None and ctx.needs_input_grad[3]
    gx, gmt, gpos = backward(grad, ids_restore, num_visible, has_cls, x_dtype, pos_grad)
    return (gx if ctx.needs_input_grad[0] else None, None,
            gmt.to(mt_dtype).reshape(1, 1, -1) if ctx.needs_input_grad[2] else None,
            gpos.to(pos_dtype).unsqueeze(0) if pos_grad else None, None)


_restore_tokens_op.register_autograd(
    lambda ctx, grad: _input_grads(ctx, grad, torch.ops.mimfast.restore_tokens_backward), setup_context=_setup)


_RestoreTokens = eager_autograd("_RestoreTokens", _forward, _setup,
                                lambda ctx, grad: _input_grads(ctx, grad, _backward_grads))


def _triton_reasons(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                    pos_embed: Optional[torch.Tensor] = None, *, has_cls: bool = True) -> list[str]:
    reasons = []
    for name, t in (("x_vis", x_vis), ("mask_token", mask_token), ("pos_embed", pos_embed)):
        if t is not None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"restore_tokens kernel supports float16/bfloat16/float32 {name}, got {t.dtype}")
    return reasons


_op = get_op("restore_tokens")
_op.register("torch")(restore_tokens_ref)


@_op.register("triton", reasons=_triton_reasons)
def _restore_tokens_triton(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                           pos_embed: Optional[torch.Tensor] = None, *, has_cls: bool = True) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.mimfast.restore_tokens(x_vis, ids_restore, mask_token, pos_embed, has_cls)
    return _RestoreTokens.apply(x_vis, ids_restore, mask_token, pos_embed, has_cls)


def restore_tokens(
    x_vis: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
    *,
    has_cls: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Decoder input of MAE: [N, 1 + K, D] -> [N, 1 + L, D] (``has_cls=False``: [N, K, D] -> [N, L, D]).

    x_vis:       [N, 1 + K, D] visible tokens in ids_keep order, the cls row first (no cls row if not has_cls)
    ids_restore: [N, L] int64, a permutation of [0, L) per sample: position l takes visible row ids_restore[n, l]
                 when it is < K, else the mask token (as :func:`mimfast.ops.random_masking` produces it)
    mask_token:  [1, 1, D]
    pos_embed:   [1, 1 + L, D] (cls row first; [1, L, D] when not has_cls) added to every row, or None
    Result dtype: torch's promotion of the input dtypes, as the reference's cat and add give. Differentiable in
    x_vis, mask_token and pos_embed; the triton backward reduces deterministically.

    Equivalent PyTorch::

        x_ = torch.cat([x_vis[:, 1:], mask_token.repeat(N, L - K, 1)], dim=1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, D))
        out = torch.cat([x_vis[:, :1], x_], dim=1) + pos_embed
    """
    _check(x_vis, ids_restore, mask_token, pos_embed, has_cls)
    return _op(x_vis, ids_restore, mask_token, pos_embed, has_cls=has_cls, backend=backend)
