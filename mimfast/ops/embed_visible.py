"""embed_visible: patch embedding of the kept patches only, plus their position embedding: [N, K, D]."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mimfast.backend import eager_autograd, get_op
from mimfast.kernels.sizes import sm_count
from mimfast.ops.gather_patches import check_distinct, check_index
from mimfast.ops.patchify import as_size, check_images, grid_size, patch_dim, span_reasons

__all__ = ["embed_visible", "embed_visible_ref"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _num_patches(imgs: torch.Tensor, patch_size: int, tubelet_size: Optional[int]) -> int:
    L = 1
    for g in grid_size(imgs.shape, patch_size, tubelet_size):
        L *= g
    return L


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype a convolution runs in under autocast on ``device_type`` (None outside autocast)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _out_dtype(conv_dtype: torch.dtype, pos_embed: Optional[torch.Tensor]) -> torch.dtype:
    # the reference adds pos_embed to the conv output, so torch's promotion decides (fp32 when a bf16 conv output
    # under autocast meets an fp32 pos_embed, as in the MAE encoder)
    return conv_dtype if pos_embed is None else torch.promote_types(conv_dtype, pos_embed.dtype)


def embed_visible_ref(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    patch_size: int,
    tubelet_size: Optional[int] = None,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference, the official path: embed all L patches with the conv, add positions, keep K rows.

    ``upcast``: compute in fp32 (autocast off) and return the dtype the computation without it gives: under
    autocast the conv's output is in the autocast dtype, promoted by pos_embed's.

    Equivalent PyTorch::

        x = F.conv2d(imgs, weight, bias, stride=p).flatten(2).transpose(1, 2)    # [N, L, D]
        x = x + pos_embed[:, 1:]                                                   # skip the cls row
        out = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))            # [N, K, D]
    """
    device_type = imgs.device.type
    dtype = _out_dtype(_autocast_dtype(device_type) or weight.dtype, pos_embed)
    if upcast:
        weight = weight.float()
        bias = None if bias is None else bias.float()
        pos_embed = None if pos_embed is None else pos_embed.float()
    with torch.autocast(device_type, enabled=False) if upcast else contextlib.nullcontext():
        x = imgs.to(weight.dtype)
        if tubelet_size is None:
            y = F.conv2d(x, weight, bias, stride=patch_size)
        else:
            y = F.conv3d(x, weight, bias, stride=(tubelet_size, patch_size, patch_size))
        y = y.flatten(2).transpose(1, 2)
        if pos_embed is not None:
            y = y + pos_embed[:, pos_embed.shape[1] - y.shape[1]:]
        y = torch.gather(y, 1, ids_keep.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    return y.to(dtype)


def _check(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           pos_embed: Optional[torch.Tensor], patch_size: int, tubelet_size: Optional[int]) -> None:
    check_images(imgs, patch_size, tubelet_size)
    L = _num_patches(imgs, patch_size, tubelet_size)
    check_index(ids_keep, imgs.shape[0], L, imgs.device, "ids_keep")
    if ids_keep.shape[1] > L:
        raise ValueError(f"ids_keep keeps {ids_keep.shape[1]} patches of {L}")
    check_distinct(ids_keep, "ids_keep")
    for name, t in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
        if t is None:
            if name == "weight":
                raise TypeError("weight must be a tensor")
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        if t.device != imgs.device:
            raise ValueError(f"{name} is on {t.device} but imgs is on {imgs.device}")
    C = imgs.shape[1]
    kernel = (patch_size, patch_size) if tubelet_size is None else (tubelet_size, patch_size, patch_size)
    if weight.dim() != 2 + len(kernel) or tuple(weight.shape[1:]) != (C, *kernel):
        raise ValueError(f"weight must be the conv weight [D, {C}, {', '.join(map(str, kernel))}], "
                         f"got {tuple(weight.shape)}")
    D = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must be [D] = [{D}], got {tuple(bias.shape)}")
    if pos_embed is not None and (pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != D
                                  or pos_embed.shape[1] not in (L, L + 1)):
        raise ValueError(f"pos_embed must be [1, 1 + L, D] (cls row first) or [1, L, D] with L = {L}, D = {D}, "
                         f"got {tuple(pos_embed.shape)}")


# the weight gradient by gather_rows + torch.mm (the GEMM library's kernel, its output rounded to the compute dtype as
# the conv's own weight gradient is: fp16 can overflow where the fp32 partials would not; in fp32 it follows the
# matmul TF32 setting, not cuDNN's; under torch.use_deterministic_algorithms it needs CUBLAS_WORKSPACE_CONFIG like
# any cuBLAS call; cuBLAS adds its split-K partials without atomics unless told to) instead of the gather-GEMM
# kernel with fp32 partials. On an H100 (bf16, ViT-B/16, batch 256: benchmarks/results/h100_2026-11-23.md) that
# kernel took 0.47 ms for the 14.8 GFLOP, 31 TFLOP/s; the library path, a gather of the kept patches and one GEMM
# of that size, is not yet timed there (sweep:embed)
WEIGHT_GRAD_VIA_GEMM = True


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands follow torch's convolution setting, so the kernel rounds like the conv it replaces
    return "tf32" if dtype != torch.float32 or torch.backends.cudnn.allow_tf32 else "ieee"


def _geometry(imgs: torch.Tensor, patch_size: int, tubelet_size: int) -> tuple[torch.Tensor, int, int]:
    """[N, C, T, H, W] view of the images (T = 1 for 2-D ones) and the patch grid (h, w)."""
    x = imgs.unsqueeze(2) if imgs.dim() == 4 else imgs
    return x, x.shape[3] // patch_size, x.shape[4] // patch_size


def _forward(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             pos_embed: Optional[torch.Tensor], patch_size: int, tubelet_size: int,
             compute_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Launch the forward GEMM: [N, K, D] embeddings, the weight (and bias) rounded to ``compute_dtype`` first."""
    from mimfast.kernels.embed_visible import embed_visible_fwd_kernel, gemm_config

    x, gh, gw = _geometry(imgs, patch_size, tubelet_size)
    N, C = x.shape[:2]
    K = ids_keep.shape[1]
    D = weight.shape[0]
    P = patch_dim(C, patch_size, tubelet_size)
    w_dtype = compute_dtype or weight.dtype
    out = torch.empty(N, K, D, dtype=_out_dtype(w_dtype, pos_embed), device=imgs.device)
    if out.numel() == 0:
        return out
    w = weight.reshape(D, P).to(w_dtype).contiguous()
    pos = pos_embed.reshape(pos_embed.shape[1], D).contiguous() if pos_embed is not None else out
    L = gh * gw * (x.shape[2] // tubelet_size)
    cfg = gemm_config(D, P)
    # one grid axis (the second and third allow 65535 programs only): D blocks of one row block are consecutive
    grid = (-(-D // cfg["BLOCK_D"]) * -(-N * K // cfg["BLOCK_M"]),)
    embed_visible_fwd_kernel[grid](
        x, ids_keep.contiguous(), w, bias.contiguous() if bias is not None else w, pos, out,
        N * K, K, D, gh, gw, pos.shape[0] - L if pos_embed is not None else 0, *x.stride(),
        C=C, PT=tubelet_size, PS=patch_size, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
        DOT_PRECISION=_dot_precision(w_dtype), **cfg)
    return out


def _backward_grads(grad: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                    patch_size: int, tubelet_size: int, compute_dtype: Optional[torch.dtype], weight_grad: bool,
                    pos_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad weight then grad bias, [D * P + D] fp32 ([D], the bias only, without ``weight_grad``), grad pos_embed
    [pos_rows, D] fp32 or empty). One tensor for the weight and the bias: the second pass is one sum.

    The weight gradient A^T @ grad is one library GEMM on the kept patches gathered again (WEIGHT_GRAD_VIA_GEMM),
    or the gather-GEMM kernel split over chunks of rows: each chunk writes an fp32 partial (weight and bias side by
    side) and one second pass adds the chunks in order. Either way it is deterministic. pos_embed rows gather
    their gradient from each sample that kept them, summed over the batch in sample order.
    """
    import triton.language as tl

    from mimfast.kernels.embed_visible import (
        embed_visible_bwd_pos_kernel,
        embed_visible_bwd_weight_kernel,
        pos_config,
        wgrad_config,
    )

    x, gh, gw = _geometry(imgs, patch_size, tubelet_size)
    N, C = x.shape[:2]
    K = ids_keep.shape[1]
    D = weight.shape[0]
    P = patch_dim(C, patch_size, tubelet_size)
    L = gh * gw * (x.shape[2] // tubelet_size)
    M = N * K
    w_dtype = compute_dtype or weight.dtype
    if M == 0 or D == 0:
        return (grad.new_zeros(D * P * weight_grad + D, dtype=torch.float32),
                grad.new_zeros(pos_rows, D, dtype=torch.float32))
    g = grad.contiguous()
    ids = ids_keep.contiguous()
    if weight_grad and WEIGHT_GRAD_VIA_GEMM:
        from mimfast.ops.gather_patches import gather_rows

        # the kept patches gathered once more, in the compute dtype, and one library GEMM (fp32 accumulation,
        # deterministic): [D, M] @ [M, P] in the patches' (t, row, col, channel) order, then the conv's order
        rows = gather_rows(imgs, ids, patch_size, tubelet_size, w_dtype).view(M, P)
        g_w = torch.mm(g.view(M, D).to(w_dtype).t(), rows)
        g_wb = torch.empty(D * P + D, dtype=torch.float32, device=grad.device)
        # one copy puts it in the conv's (channel, t, row, col) order and in fp32; the bias sum upcasts as it reads
        g_wb[:D * P].view(D, C, tubelet_size, patch_size, patch_size).copy_(
            g_w.view(D, tubelet_size, patch_size, patch_size, C).permute(0, 4, 1, 2, 3))
        torch.sum(g.view(M, D), 0, dtype=torch.float32, out=g_wb[D * P:])
    elif weight_grad:
        cfg = wgrad_config(D, P)
        tiles = -(-D // cfg["BLOCK_D"]) * -(-P // cfg["BLOCK_P"])
        blocks = -(-M // cfg["BLOCK_M"])
        # two programs fit an SM: split the rows into as many chunks as fill those slots in one wave, and no more
        # (every chunk is one more [D, P] fp32 partial to write and add up)
        chunks = max(1, min(blocks, 2 * sm_count(grad.device) // tiles))
        m_per = -(-blocks // chunks) * cfg["BLOCK_M"]
        chunks = -(-M // m_per)
        part = torch.empty(chunks, D * P + D, dtype=torch.float32, device=grad.device)
        dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[w_dtype]
        embed_visible_bwd_weight_kernel[(-(-D // cfg["BLOCK_D"]), -(-P // cfg["BLOCK_P"]), chunks)](
            x, ids, g, part, M, K, D, gh, gw, m_per, *x.stride(), C=C, PT=tubelet_size, PS=patch_size,
            DOT_DTYPE=dot_dtype, DOT_PRECISION=_dot_precision(w_dtype), **cfg)
        g_wb = part.sum(0)
    else:
        g_wb = g.view(M, D).sum(0, dtype=torch.float32)
    g_pos = grad.new_empty(pos_rows, D, dtype=torch.float32)
    if pos_rows:
        g_pos[:pos_rows - L].zero_()  # the cls row: no patch token reaches it
        inv = torch.full((N, L), -1, dtype=torch.int64, device=grad.device)
        inv.scatter_(1, ids, torch.arange(K, device=grad.device).expand(N, K))
        cfg = pos_config(L, D)
        embed_visible_bwd_pos_kernel[(-(-L // cfg["BLOCK_L"]), -(-D // cfg["BLOCK_D"]))](
            g, inv, g_pos, N, L, K, D, pos_rows - L, **cfg)
    return g_wb, g_pos


@torch.library.custom_op("mimfast::embed_visible", mutates_args=())
def _embed_visible_op(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      pos_embed: Optional[torch.Tensor], patch_size: int, tubelet_size: int,
                      compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return _forward(imgs, ids_keep, weight, bias, pos_embed, patch_size, tubelet_size, compute_dtype)


@_embed_visible_op.register_fake
def _(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
      pos_embed: Optional[torch.Tensor], patch_size: int, tubelet_size: int,
      compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], weight.shape[0],
                          dtype=_out_dtype(compute_dtype or weight.dtype, pos_embed))


@torch.library.custom_op("mimfast::embed_visible_backward", mutates_args=())
def _embed_visible_backward_op(
    grad: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, patch_size: int,
    tubelet_size: int, compute_dtype: Optional[torch.dtype], weight_grad: bool, pos_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_grads(grad, imgs, ids_keep, weight, patch_size, tubelet_size, compute_dtype, weight_grad,
                           pos_rows)


@_embed_visible_backward_op.register_fake
def _(grad: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, patch_size: int,
      tubelet_size: int, compute_dtype: Optional[torch.dtype], weight_grad: bool,
      pos_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    D = weight.shape[0]
    P = patch_dim(imgs.shape[1], patch_size, tubelet_size)
    return (grad.new_empty(D * P * weight_grad + D, dtype=torch.float32),
            grad.new_empty(pos_rows, D, dtype=torch.float32))


def _setup(ctx, inputs, output) -> None:
    imgs, ids_keep, weight, bias, pos_embed, patch_size, tubelet_size, compute_dtype = inputs
    ctx.save_for_backward(imgs, ids_keep, weight)
    ctx.meta = (patch_size, tubelet_size, compute_dtype, None if bias is None else bias.dtype,
                None if pos_embed is None else (pos_embed.dtype, pos_embed.shape[1]))


def _input_grads(ctx, grad: torch.Tensor, backward: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    imgs, ids_keep, weight = ctx.saved_tensors
    patch_size, tubelet_size, compute_dtype, bias_dtype, pos = ctx.meta
    need_imgs, _, need_w, need_b, need_pos = ctx.needs_input_grad[:5]
    pos_rows = pos[1] if pos is not None and need_pos else 0
    g_wb, g_pos = backward(grad, imgs, ids_keep, weight, patch_size, tubelet_size, compute_dtype, need_w, pos_rows)
    D = weight.shape[0]
    g_imgs = None
    if need_imgs:
        # rarely needed (images are data): a dense matmul back to patch rows, then the gather_patches scatter
        w_rows = weight.to(compute_dtype or weight.dtype).movedim(1, -1).reshape(D, -1)  # (t, row, col, channel)
        patches = (grad.to(w_rows.dtype) @ w_rows).to(imgs.dtype)
        g_imgs = torch.ops.mimfast.gather_patches_backward(patches, ids_keep, list(imgs.shape), patch_size,
                                                           tubelet_size)
    # the weight and bias gradients stay fp32 until they meet their own dtype (under autocast, the fp32 master
    # weights): no round trip through the compute dtype
    return (g_imgs, None, g_wb[:-D].to(weight.dtype).view(weight.shape) if need_w else None,
            g_wb[-D:].to(bias_dtype) if need_b and bias_dtype is not None else None,
            g_pos.to(pos[0]).unsqueeze(0) if pos_rows else None, None, None, None)


_embed_visible_op.register_autograd(
    lambda ctx, grad: _input_grads(ctx, grad, torch.ops.mimfast.embed_visible_backward), setup_context=_setup)


_EmbedVisible = eager_autograd("_EmbedVisible", _forward, _setup,
                               lambda ctx, grad: _input_grads(ctx, grad, _backward_grads))


def _triton_reasons(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    pos_embed: Optional[torch.Tensor], patch_size: int,
                    tubelet_size: Optional[int] = None) -> list[str]:
    reasons = []
    for name, t in (("imgs", imgs), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            reasons.append(f"embed_visible kernel supports float16/bfloat16/float32 {name}, got {t.dtype}")
    if ids_keep.numel() >= 2**31:
        reasons.append(f"embed_visible kernel needs N*K < 2^31, got {ids_keep.numel()}")
    return reasons + span_reasons({"imgs": imgs}, patch_size, tubelet_size)


_op = get_op("embed_visible")
_op.register("torch")(embed_visible_ref)


@_op.register("triton", reasons=_triton_reasons)
def _embed_visible_triton(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor], pos_embed: Optional[torch.Tensor], patch_size: int,
                          tubelet_size: Optional[int] = None) -> torch.Tensor:
    device_type = imgs.device.type
    # under autocast the conv would run in the autocast dtype: the kernel rounds the weight and bias to it and
    # converts the pixels as it loads them, so neither a cast copy of the images nor a cast node on the weight exists
    compute_dtype = _autocast_dtype(device_type)
    args = (imgs, ids_keep, weight, bias, pos_embed, patch_size, tubelet_size or 1, compute_dtype)
    if torch.compiler.is_compiling():
        return torch.ops.mimfast.embed_visible(*args)
    return _EmbedVisible.apply(*args)

def embed_visible(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    patch_size: int,
    tubelet_size: Optional[int] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Patch embedding of the kept patches plus their position embedding: [N, K, D].

    imgs:      [N, C, H, W] images (or [N, C, T, H, W] videos with ``tubelet_size``), read in their storage dtype
               and converted to the weight dtype (the triton kernel reads only the kept patches)
    ids_keep:  [N, K] int64 kept patch indices, distinct within a sample
    weight:    conv weight [D, C, p, p] (video: [D, C, p_t, p, p]); bias [D] or None
    pos_embed: [1, 1 + L, D] with the cls row first (as the models store it), [1, L, D] without one, or None
    Result dtype: the weight dtype promoted with pos_embed's, as the reference's add gives. Gradients reach weight,
    bias and pos_embed (deterministic reductions); imgs too when it requires grad.

    Equivalent PyTorch::

        x = F.conv2d(imgs, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos_embed[:, 1:]
        out = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))
    """
    patch_size, tubelet_size = as_size(patch_size), as_size(tubelet_size)
    _check(imgs, ids_keep, weight, bias, pos_embed, patch_size, tubelet_size)
    return _op(imgs, ids_keep, weight, bias, pos_embed, patch_size, tubelet_size, backend=backend)
