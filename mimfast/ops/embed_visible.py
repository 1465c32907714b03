"""embed_visible: patch embedding of the kept patches only, plus their position embedding: [N, K, D]."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mimfast.backend import get_op
from mimfast.ops.gather_patches import check_index
from mimfast.ops.patchify import check_images, grid_size, patch_dim

__all__ = ["embed_visible", "embed_visible_ref"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _num_patches(imgs: torch.Tensor, patch_size: int, tubelet_size: Optional[int]) -> int:
    L = 1
    for g in grid_size(imgs.shape, patch_size, tubelet_size):
        L *= g
    return L


def _out_dtype(weight: torch.Tensor, pos_embed: Optional[torch.Tensor]) -> torch.dtype:
    # the reference adds pos_embed to the conv output, so torch's promotion decides (fp32 when a bf16 conv output
    # under autocast meets an fp32 pos_embed, as in the MAE encoder)
    return weight.dtype if pos_embed is None else torch.promote_types(weight.dtype, pos_embed.dtype)


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

    ``upcast``: compute in fp32 and return the result dtype.

    Equivalent PyTorch::

        x = F.conv2d(imgs, weight, bias, stride=p).flatten(2).transpose(1, 2)    # [N, L, D]
        x = x + pos_embed[:, 1:]                                                   # skip the cls row
        out = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))            # [N, K, D]
    """
    dtype = _out_dtype(weight, pos_embed)
    if upcast:
        weight = weight.float()
        bias = None if bias is None else bias.float()
        pos_embed = None if pos_embed is None else pos_embed.float()
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


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands follow torch's convolution setting, so the kernel rounds like the conv it replaces
    return "tf32" if dtype != torch.float32 or torch.backends.cudnn.allow_tf32 else "ieee"


def _geometry(imgs: torch.Tensor, patch_size: int, tubelet_size: int) -> tuple[torch.Tensor, int, int]:
    """[N, C, T, H, W] view of the images (T = 1 for 2-D ones) and the patch grid (h, w)."""
    x = imgs.unsqueeze(2) if imgs.dim() == 4 else imgs
    return x, x.shape[3] // patch_size, x.shape[4] // patch_size


@torch.library.custom_op("mimfast::embed_visible", mutates_args=())
def _embed_visible_op(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      pos_embed: Optional[torch.Tensor], patch_size: int, tubelet_size: int) -> torch.Tensor:
    from mimfast.kernels.embed_visible import embed_visible_fwd_kernel, gemm_config

    x, gh, gw = _geometry(imgs, patch_size, tubelet_size)
    N, C = x.shape[:2]
    K = ids_keep.shape[1]
    D = weight.shape[0]
    P = patch_dim(C, patch_size, tubelet_size)
    out = torch.empty(N, K, D, dtype=_out_dtype(weight, pos_embed), device=imgs.device)
    if out.numel() == 0:
        return out
    w = weight.reshape(D, P).contiguous()
    pos = pos_embed.reshape(pos_embed.shape[1], D).contiguous() if pos_embed is not None else out
    L = gh * gw * (x.shape[2] // tubelet_size)
    cfg = gemm_config(D, P)
    grid = (-(-D // cfg["BLOCK_D"]), -(-N * K // cfg["BLOCK_M"]))
    embed_visible_fwd_kernel[grid](
        x, ids_keep.contiguous(), w, bias.contiguous() if bias is not None else w, pos, out,
        N * K, K, D, gh, gw, pos.shape[0] - L if pos_embed is not None else 0, *x.stride(),
        C=C, PT=tubelet_size, PS=patch_size, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
        DOT_PRECISION=_dot_precision(w.dtype), **cfg)
    return out


@_embed_visible_op.register_fake
def _(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
      pos_embed: Optional[torch.Tensor], patch_size: int, tubelet_size: int) -> torch.Tensor:
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], weight.shape[0], dtype=_out_dtype(weight, pos_embed))


@torch.library.custom_op("mimfast::embed_visible_backward", mutates_args=())
def _embed_visible_backward_op(
    grad: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, patch_size: int,
    tubelet_size: int, weight_grad: bool, pos_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad weight [D, P] fp32 or empty, grad bias [D] fp32, grad pos_embed [pos_rows, D] fp32 or empty).

    The weight gradient A^T @ grad is split over chunks of rows: each chunk writes an fp32 partial and a second
    pass adds the chunks in order, so it is deterministic; the bias gradient comes from the same pass. pos_embed
    rows gather their gradient from each sample that kept them, summed over the batch in sample order.
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
    g = grad.contiguous()
    ids = ids_keep.contiguous()
    g_w = grad.new_zeros(D if weight_grad else 0, P, dtype=torch.float32)
    g_b = grad.new_zeros(D, dtype=torch.float32)
    g_pos = grad.new_zeros(pos_rows, D, dtype=torch.float32)
    if M == 0 or D == 0:
        return g_w, g_b, g_pos
    if weight_grad:
        cfg = wgrad_config(D, P)
        tiles = -(-D // cfg["BLOCK_D"]) * -(-P // cfg["BLOCK_P"])
        blocks = -(-M // cfg["BLOCK_M"])
        # split the rows only as far as needed to give every SM two programs: fewer partials to add up
        chunks = max(1, min(blocks, -(-2 * _sm_count(grad.device) // tiles)))
        m_per = -(-blocks // chunks) * cfg["BLOCK_M"]
        chunks = -(-M // m_per)
        part_w = torch.empty(chunks, D, P, dtype=torch.float32, device=grad.device)
        part_b = torch.empty(chunks, D, dtype=torch.float32, device=grad.device)
        dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[weight.dtype]
        embed_visible_bwd_weight_kernel[(-(-D // cfg["BLOCK_D"]), -(-P // cfg["BLOCK_P"]), chunks)](
            x, ids, g, part_w, part_b, M, K, D, gh, gw, m_per, *x.stride(), C=C, PT=tubelet_size, PS=patch_size,
            DOT_DTYPE=dot_dtype, DOT_PRECISION=_dot_precision(weight.dtype), **cfg)
        g_w = part_w.sum(0)
        g_b = part_b.sum(0)
    else:
        g_b = g.view(M, D).float().sum(0)
    if pos_rows:
        inv = torch.full((N, L), -1, dtype=torch.int64, device=grad.device)
        inv.scatter_(1, ids, torch.arange(K, device=grad.device).expand(N, K))
        cfg = pos_config(L, D)
        embed_visible_bwd_pos_kernel[(-(-L // cfg["BLOCK_L"]), -(-D // cfg["BLOCK_D"]))](
            g, inv, g_pos, N, L, K, D, pos_rows - L, **cfg)
    return g_w, g_b, g_pos


@_embed_visible_backward_op.register_fake
def _(grad: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, patch_size: int,
      tubelet_size: int, weight_grad: bool, pos_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D = weight.shape[0]
    P = patch_dim(imgs.shape[1], patch_size, tubelet_size)
    f32 = torch.float32
    return (grad.new_empty(D if weight_grad else 0, P, dtype=f32), grad.new_empty(D, dtype=f32),
            grad.new_empty(pos_rows, D, dtype=f32))


def _setup(ctx, inputs, output) -> None:
    imgs, ids_keep, weight, bias, pos_embed, patch_size, tubelet_size = inputs
    ctx.save_for_backward(imgs, ids_keep, weight)
    ctx.meta = (patch_size, tubelet_size, None if bias is None else bias.dtype,
                None if pos_embed is None else (pos_embed.dtype, pos_embed.shape[1]))


def _backward(ctx, grad: torch.Tensor):
    imgs, ids_keep, weight = ctx.saved_tensors
    patch_size, tubelet_size, bias_dtype, pos = ctx.meta
    need_imgs, _, need_w, need_b, need_pos = ctx.needs_input_grad[:5]
    pos_rows = pos[1] if pos is not None and need_pos else 0
    g_w, g_b, g_pos = torch.ops.mimfast.embed_visible_backward(grad, imgs, ids_keep, weight, patch_size,
                                                               tubelet_size, need_w, pos_rows)
    g_imgs = None
    if need_imgs:
        # rarely needed (images are data): a dense matmul back to patch rows, then the gather_patches scatter
        D = weight.shape[0]
        w_rows = weight.movedim(1, -1).reshape(D, -1)  # [D, P] in the (t, row, col, channel) patch order
        patches = (grad.to(weight.dtype) @ w_rows).to(imgs.dtype)
        g_imgs = torch.ops.mimfast.gather_patches_backward(patches, ids_keep, list(imgs.shape), patch_size,
                                                           tubelet_size)
    return (g_imgs, None, g_w.to(weight.dtype).reshape(weight.shape) if need_w else None,
            g_b.to(bias_dtype) if need_b and bias_dtype is not None else None,
            g_pos.to(pos[0]).unsqueeze(0) if pos_rows else None, None, None)


_embed_visible_op.register_autograd(_backward, setup_context=_setup)


def _triton_reasons(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    pos_embed: Optional[torch.Tensor], patch_size: int,
                    tubelet_size: Optional[int] = None) -> list[str]:
    reasons = []
    for name, t in (("imgs", imgs), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            reasons.append(f"embed_visible kernel supports float16/bfloat16/float32 {name}, got {t.dtype}")
    if ids_keep.numel() >= 2**31:
        reasons.append(f"embed_visible kernel needs N*K < 2^31, got {ids_keep.numel()}")
    return reasons


_op = get_op("embed_visible")
_op.register("torch")(embed_visible_ref)


@_op.register("triton", reasons=_triton_reasons)
def _embed_visible_triton(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor], pos_embed: Optional[torch.Tensor], patch_size: int,
                          tubelet_size: Optional[int] = None) -> torch.Tensor:
    device_type = imgs.device.type
    if torch.is_autocast_enabled(device_type):
        # what autocast does to a conv's weight and bias; the images are converted as they are loaded, so the
        # full-size cast copy of the reference never exists
        dtype = torch.get_autocast_dtype(device_type)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return torch.ops.mimfast.embed_visible(imgs, ids_keep, weight, bias, pos_embed, patch_size, tubelet_size or 1)


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
    _check(imgs, ids_keep, weight, bias, pos_embed, patch_size, tubelet_size)
    return _op(imgs, ids_keep, weight, bias, pos_embed, patch_size, tubelet_size, backend=backend)
