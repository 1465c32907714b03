"""Masked reconstruction losses, forward + backward: MAE pixel loss, VideoMAE loss, and the fused prediction head.

    python -m benchmarks.bench_loss                                          # real shapes, on the GPU
    TRITON_INTERPRET=1 python -m benchmarks.bench_loss --quick --no-save     # tiny shapes, CPU smoke run

Pixel losses (MAE ViT-B/16, ViT-L/16 with P = 768, ViT-H/14 with P = 588, batch 256 at 224 px, mask ratio 0.75,
norm_pix on; VideoMAE-B: batch 64, 16 x 224 x 224, tubelet 2, tube mask ratio 0.9, 1568 tokens, P = 1536,
norm_target on): the loss and the gradient for pred from fp32 images. Providers: ``mimfast`` (the fused kernel),
``reference`` (the torch reference the tests use), ``reference+compile`` (``torch.compile`` of it). MAE runs with
pred holding all L rows (``full``) and with only the masked rows (``masked_rows``, ``ids_masked``). The kernel's
tile settings were chosen with ``benchmarks.sweep``.

Bytes that must move (PERF_NOTES.md): pred read, the masked patches of the images read, the pred gradient
written; nothing else (statistics live in registers). ``copy`` times a device-to-device copy of as many bytes:
the bandwidth the loss target is stated against, measured at the case's own size.

Fused head (MAE ViT-B decoder: hidden [256, 196, 512], decoder_pred 512 -> 768): loss and the gradients of hidden,
weight and bias. Providers: ``mimfast`` (``fused_head_masked_pixel_loss`` as the fused MAE calls it: the masked
rows only, given by ``ids_masked``, so no mask is read; default chunks: one at this size), ``mimfast/two_chunks``
(the same in two chunks: more launches, a lower peak), ``mimfast/all_rows`` (every row projected and scored,
weighted by the mask: a third more GEMM work, but no row copy, no zero fill and no scatter),
``decoder_pred+loss`` (nn.Linear over all rows, then the fused loss kernel), ``reference`` (nn.Linear + the torch
reference loss) and ``reference+compile``. Flops count the three GEMMs on the masked rows (the useful work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import COPY_PROVIDER, Case, common_args, copy_provider, default_device, run, write_results
from mimfast.ops import (
    fused_head_masked_pixel_loss,
    fused_head_masked_pixel_loss_ref,
    masked_pixel_loss,
    masked_pixel_loss_ref,
    random_masking,
    videomae_pixel_loss,
    videomae_pixel_loss_ref,
)
from mimfast.ops.fused_head_loss import masked_ids_from_restore


@dataclass(frozen=True)
class MAEShape:
    name: str
    batch: int
    img: int
    patch: int
    mask_ratio: float = 0.75


@dataclass(frozen=True)
class VideoShape:
    name: str
    batch: int
    frames: int
    img: int
    patch: int
    tubelet: int
    mask_ratio: float = 0.9


@dataclass(frozen=True)
class HeadShape:
    name: str
    batch: int
    img: int
    patch: int
    width: int
    mask_ratio: float = 0.75


MAE_FULL = [MAEShape("mae_vit_b16", 256, 224, 16), MAEShape("mae_vit_l16", 256, 224, 16),
            MAEShape("mae_vit_h14", 256, 224, 14)]
VIDEO_FULL = [VideoShape("videomae_b", 64, 16, 224, 16, 2)]
HEAD_FULL = [HeadShape("mae_vit_b16_head", 256, 224, 16, 512)]
MAE_QUICK = [MAEShape("quick_mae", 2, 16, 4)]
VIDEO_QUICK = [VideoShape("quick_video", 2, 4, 8, 4, 2, 0.5)]
HEAD_QUICK = [HeadShape("quick_head", 2, 16, 4, 16)]


def grad_step(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], Any]:
    """One forward + backward: the loss and the gradients of ``leaves``."""
    return lambda: torch.autograd.grad(fn(), leaves)


def mae_cases(s: MAEShape, device: torch.device, dtype: torch.dtype) -> list[tuple[Case, dict[str, Callable]]]:
    N, p = s.batch, s.patch
    L, P = (s.img // p) ** 2, p * p * 3
    imgs = torch.randn(N, 3, s.img, s.img, device=device)
    info = random_masking(N, L, s.mask_ratio, device=device)
    K = info.ids_keep.shape[1]
    ids = masked_ids_from_restore(info.ids_restore, K)
    compiled = torch.compile(masked_pixel_loss_ref, dynamic=False)

    def providers(pred: torch.Tensor, kw: dict[str, Any]) -> dict[str, Callable]:
        return {
            "mimfast": grad_step(lambda: masked_pixel_loss(pred, imgs, info.mask, p, backend="triton", **kw), [pred]),
            "reference": grad_step(lambda: masked_pixel_loss_ref(pred, imgs, info.mask, p, **kw), [pred]),
            "reference+compile": grad_step(lambda: compiled(pred, imgs, info.mask, p, **kw), [pred]),
            COPY_PROVIDER: copy_provider(moved_bytes(pred), device),
        }

    def moved_bytes(pred: torch.Tensor) -> int:
        # the scored (masked) rows of pred read, its whole gradient written (zeros for unscored rows), the masked
        # patches' pixels read: a row of weight 0 is never read
        return (N * (L - K) * P * pred.element_size() + pred.numel() * pred.element_size()
                + N * (L - K) * P * imgs.element_size())

    out = []
    for rows in ("full", "masked_rows"):
        R = L if rows == "full" else L - K
        pred = torch.randn(N, R, P, device=device, dtype=dtype, requires_grad=True)
        kw = {"norm_pix": True, **({"ids_masked": ids} if rows == "masked_rows" else {})}
        moved = moved_bytes(pred)
        case = Case(f"{s.name}/{rows}/P{P}/fwd+bwd", bytes=moved, meta={"N": N, "L": L, "rows": R, "P": P})
        out.append((case, providers(pred, kw)))
    return out


def video_cases(s: VideoShape, device: torch.device, dtype: torch.dtype) -> list[tuple[Case, dict[str, Callable]]]:
    N, p, pt = s.batch, s.patch, s.tubelet
    t, hw = s.frames // pt, (s.img // p) ** 2
    L, P = t * hw, pt * p * p * 3
    videos = torch.randn(N, 3, s.frames, s.img, s.img, device=device)
    spatial = random_masking(N, hw, s.mask_ratio, device=device).mask.bool()
    mask = spatial.repeat(1, t)  # tube masking: one spatial mask for every time slice
    R = int(mask[0].sum())
    pred = torch.randn(N, R, P, device=device, dtype=dtype, requires_grad=True)
    compiled = torch.compile(videomae_pixel_loss_ref, dynamic=False)
    moved = 2 * N * R * P * pred.element_size() + N * R * P * videos.element_size()
    case = Case(f"{s.name}/L{L}/P{P}/fwd+bwd", bytes=moved, meta={"N": N, "L": L, "rows": R, "P": P})
    return [(case, {
        "mimfast": grad_step(lambda: videomae_pixel_loss(pred, videos, mask, p, pt, backend="triton"), [pred]),
        "reference": grad_step(lambda: videomae_pixel_loss_ref(pred, videos, mask, p, pt), [pred]),
        "reference+compile": grad_step(lambda: compiled(pred, videos, mask, p, pt), [pred]),
        COPY_PROVIDER: copy_provider(moved, device),
    })]


def head_cases(s: HeadShape, device: torch.device, dtype: torch.dtype) -> list[tuple[Case, dict[str, Callable]]]:
    N, p, D = s.batch, s.patch, s.width
    L, P = (s.img // p) ** 2, p * p * 3
    imgs = torch.randn(N, 3, s.img, s.img, device=device)
    info = random_masking(N, L, s.mask_ratio, device=device)
    R = L - info.ids_keep.shape[1]
    ids = masked_ids_from_restore(info.ids_restore, info.ids_keep.shape[1])
    hidden = torch.randn(N, L, D, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(P, D, device=device) / D**0.5).to(dtype).requires_grad_()
    bias = torch.zeros(P, device=device, dtype=dtype, requires_grad=True)
    leaves = [hidden, weight, bias]
    elt = hidden.element_size()
    moved = N * R * D * elt + N * L * D * elt + N * R * P * imgs.element_size()  # hidden rows in, grad out, targets
    case = Case(f"{s.name}/D{D}/P{P}/fwd+bwd", bytes=moved, flops=3 * 2.0 * N * R * P * D,
                meta={"N": N, "L": L, "rows": R, "P": P, "D": D})

    def unfused_ref(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return masked_pixel_loss_ref(F.linear(h, w, b), imgs, info.mask, p, norm_pix=True)

    compiled = torch.compile(unfused_ref, dynamic=False)
    return [(case, {
        "mimfast": grad_step(lambda: fused_head_masked_pixel_loss(
            hidden, weight, bias, imgs, None, p, ids_masked=ids, norm_pix=True, backend="triton"), leaves),
        "mimfast/two_chunks": grad_step(lambda: fused_head_masked_pixel_loss(
            hidden, weight, bias, imgs, None, p, ids_masked=ids, norm_pix=True, chunk_size=-(-N // 2) * R,
            backend="triton"), leaves),
        "mimfast/all_rows": grad_step(lambda: fused_head_masked_pixel_loss(
            hidden, weight, bias, imgs, info.mask, p, norm_pix=True, backend="triton"), leaves),
        "decoder_pred+loss": grad_step(lambda: masked_pixel_loss(
            F.linear(hidden, weight, bias), imgs, info.mask, p, norm_pix=True, backend="triton"), leaves),
        "reference": grad_step(lambda: fused_head_masked_pixel_loss_ref(
            hidden, weight, bias, imgs, info.mask, p, norm_pix=True), leaves),
        "reference+compile": grad_step(lambda: compiled(hidden, weight, bias), leaves),
    })]


def all_cases(quick: bool, device: torch.device, dtype: torch.dtype) -> list[tuple[Case, dict[str, Callable]]]:
    mae, video, head = (MAE_QUICK, VIDEO_QUICK, HEAD_QUICK) if quick else (MAE_FULL, VIDEO_FULL, HEAD_FULL)
    cases = []
    for s in mae:
        cases += mae_cases(s, device, dtype)
    for v in video:
        cases += video_cases(v, device, dtype)
    for h in head:
        cases += head_cases(h, device, dtype)
    return cases


def main() -> None:
    ap = common_args(__doc__.splitlines()[0])
    args = ap.parse_args()
    device = default_device()
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # CPU runs are smoke tests; the interpreter's bf16 rounding is not the GPU's
        print("CPU run: float32 instead of bfloat16")
    cases = all_cases(args.quick, device, dtype)
    rows = run(cases, device, args.providers, args.cases, profile=args.profile, graph=args.graph,
               name="bench_loss" if not args.no_save else None)
    if not args.no_save:
        write_results("bench_loss", rows, device, {"dtype": str(dtype).replace("torch.", "")})


if __name__ == "__main__":
    main()
