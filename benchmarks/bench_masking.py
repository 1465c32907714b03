"""Masking + visible patch embedding (forward + backward), kept-patch gathering, and decoder-input restore
(forward + backward).

    python -m benchmarks.bench_masking                       # MAE ViT-B/L/H and VideoMAE-B shapes, on the GPU
    TRITON_INTERPRET=1 python -m benchmarks.bench_masking --quick --no-save   # tiny shapes, CPU smoke run

Providers: ``mimfast`` (random_masking + embed_visible / restore_tokens kernels), ``reference`` (the official
path: torch.rand + two argsorts, conv over all L patches + pos_embed, gather; patchify + gather for the kept
patches; for restore MAE's cat + gather + add, and for video VideoMAE's cat of the visible tokens and the mask
tokens, each plus its positions) and ``reference+compile`` (torch.compile of the same function). Bytes count what
must move: the kept pixels (read forward and again for the weight gradient), embeddings and their gradient,
indices and mask; gather: the kept pixels in, [N, K, P] out, ids_keep; restore: visible rows in, decoder input
out, and the same backward. Gather and restore also time ``copy``: a device-to-device copy of
the same number of bytes, the bandwidth their targets are stated against. Flops: the kept-patch GEMMs (forward
and weight gradient). Image shapes also time BEiT block-wise masking (40% of the patches): the kernel against the
same rule drawn on the host and copied to the device (``reference``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.harness import COPY_PROVIDER, Case, common_args, copy_provider, default_device, run, write_results
from mimfast.ops import block_masking, embed_visible, gather_patches, patchify, random_masking, restore_tokens


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    img: int
    patch: int
    width: int  # encoder width D
    decoder_width: int
    mask_ratio: float
    frames: Optional[int] = None  # video: frames and tubelet size
    tubelet: Optional[int] = None
    channels: int = 3

    @property
    def grid(self) -> int:
        spatial = (self.img // self.patch) ** 2
        return spatial * (self.frames // self.tubelet if self.frames else 1)

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch * self.patch * (self.tubelet or 1)

    @property
    def kept(self) -> int:
        return int(self.grid * (1 - self.mask_ratio))

    def image_shape(self) -> tuple[int, ...]:
        if self.frames:
            return (self.batch, self.channels, self.frames, self.img, self.img)
        return (self.batch, self.channels, self.img, self.img)


FULL = [
    Shape("mae_vit_b16", 256, 224, 16, 768, 512, 0.75),
    Shape("mae_vit_l16", 256, 224, 16, 1024, 512, 0.75),
    Shape("mae_vit_h14", 256, 224, 14, 1280, 512, 0.75),
    Shape("videomae_b16", 64, 224, 16, 768, 384, 0.9, frames=16, tubelet=2),
]
QUICK = [
    Shape("quick_img", 2, 16, 4, 32, 16, 0.75),
    Shape("quick_video", 1, 16, 4, 32, 16, 0.9, frames=4, tubelet=2),
]


def reference_embed(imgs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor,
                    s: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official path: random_masking by argsort of uniform noise, conv over every patch, + pos, gather."""
    N, L, K = s.batch, s.grid, s.kept
    noise = torch.rand(N, L, device=imgs.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :K]
    if s.tubelet:
        x = F.conv3d(imgs, weight, bias, stride=(s.tubelet, s.patch, s.patch))
    else:
        x = F.conv2d(imgs, weight, bias, stride=s.patch)
    x = x.flatten(2).transpose(1, 2) + pos_embed[:, 1:]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    mask = torch.ones(N, L, device=imgs.device)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x, mask, ids_restore


def mimfast_embed(imgs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor,
                  s: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    info = random_masking(s.batch, s.grid, s.mask_ratio, device=imgs.device)
    x = embed_visible(imgs, info.ids_keep, weight, bias, pos_embed, s.patch, s.tubelet, backend="triton")
    return x, info.mask, info.ids_restore


def reference_restore(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                      pos_embed: torch.Tensor) -> torch.Tensor:
    """The MAE decoder's unshuffle: cat mask tokens, gather by ids_restore, put the cls row back, + pos."""
    N, L = ids_restore.shape
    D = x_vis.shape[-1]
    mask_tokens = mask_token.repeat(N, L + 1 - x_vis.shape[1], 1)
    x_ = torch.cat([x_vis[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    return torch.cat([x_vis[:, :1], x_], dim=1) + pos_embed


def reference_restore_video(x_vis: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor,
                            pos_embed: torch.Tensor) -> torch.Tensor:
    """The VideoMAE decoder's input: visible tokens plus their positions, then mask tokens plus theirs (no cls
    row; the decoder is permutation-equivariant, so this order and restore_tokens' token order are equivalent)."""
    N, K, D = x_vis.shape
    pos = pos_embed.expand(N, -1, -1)
    return torch.cat((x_vis + pos[~mask].reshape(N, K, D), mask_token + pos[mask].reshape(N, -1, D)), dim=1)


def mimfast_restore(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                    pos_embed: torch.Tensor, has_cls: bool = True) -> torch.Tensor:
    return restore_tokens(x_vis, ids_restore, mask_token, pos_embed, has_cls=has_cls, backend="triton")


def embed_case(s: Shape, device: torch.device, dtype: torch.dtype) -> tuple[Case, dict[str, Callable[[], Any]]]:
    N, L, K, P, D = s.batch, s.grid, s.kept, s.patch_dim, s.width
    imgs = torch.randn(s.image_shape(), device=device)  # data arrives as fp32
    kernel = (s.patch, s.patch) if not s.tubelet else (s.tubelet, s.patch, s.patch)
    weight = (torch.randn(D, s.channels, *kernel, device=device) * P**-0.5).requires_grad_()
    bias = torch.zeros(D, device=device, requires_grad=True)
    pos_embed = torch.randn(1, 1 + L, D, device=device)  # fixed sin-cos table in MAE / VideoMAE: no gradient
    out_bytes = 4  # bf16 conv output + fp32 pos_embed promotes to fp32, as in the MAE encoder
    moved = (2 * N * K * P * 4  # kept pixels, read forward and for the weight gradient
             + 2 * N * K * D * out_bytes  # embeddings written, their gradient read
             + (1 + L) * D * 4  # the pos_embed table, read once (its rows are gathered from L2)
             + D * P * 8  # the fp32 weight read, its gradient written
             + N * K * 8 + N * L * 12)  # ids_keep, ids_restore, mask
    case = Case(f"{s.name}/mask+embed fwd+bwd", bytes=moved, flops=4.0 * N * K * P * D,
                meta={"N": N, "L": L, "K": K, "P": P, "D": D})

    grad_out = torch.ones(N, K, D, device=device)

    def provider(fn: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[[], Any]:
        def step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                x, _, _ = fn(imgs, weight, bias, pos_embed, s)
            x.backward(grad_out)
            weight.grad = bias.grad = None

        return step

    compiled = torch.compile(reference_embed, dynamic=False)
    return case, {"mimfast": provider(mimfast_embed), "reference": provider(reference_embed),
                  "reference+compile": provider(compiled)}


def reference_gather(imgs: torch.Tensor, ids_keep: torch.Tensor, s: Shape) -> torch.Tensor:
    x = patchify(imgs, s.patch, s.tubelet)
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_case(s: Shape, device: torch.device, dtype: torch.dtype,
                suffix: str = "") -> tuple[Case, dict[str, Callable[[], Any]]]:
    """Gather of the kept patches from images of ``dtype`` (fp32 as the data arrive, or the benchmark's dtype: a
    bf16 patch row is a 32-byte run, harder to move at full bandwidth)."""
    N, L, K, P = s.batch, s.grid, s.kept, s.patch_dim
    imgs = torch.randn(s.image_shape(), device=device, dtype=dtype)
    ids_keep = random_masking(N, L, s.mask_ratio, device=device).ids_keep
    moved = 2 * N * K * P * imgs.element_size() + N * K * 8
    case = Case(f"{s.name}/gather fwd{suffix}", bytes=moved, meta={"N": N, "L": L, "K": K, "P": P})
    compiled = torch.compile(reference_gather, dynamic=False)
    return case, {"mimfast": lambda: gather_patches(imgs, ids_keep, s.patch, s.tubelet, backend="triton"),
                  "reference": lambda: reference_gather(imgs, ids_keep, s),
                  "reference+compile": lambda: compiled(imgs, ids_keep, s),
                  COPY_PROVIDER: copy_provider(moved, device)}


def restore_case(s: Shape, device: torch.device, dtype: torch.dtype) -> tuple[Case, dict[str, Callable[[], Any]]]:
    N, L, K, D = s.batch, s.grid, s.kept, s.decoder_width
    cls = 0 if s.frames else 1  # MAE's decoder keeps the cls row; VideoMAE's has none
    x_vis = torch.randn(N, cls + K, D, device=device, dtype=dtype, requires_grad=True)  # decoder_embed output
    mask_token = torch.randn(1, 1, D, device=device, requires_grad=True)
    pos_embed = torch.randn(1, cls + L, D, device=device)
    info = random_masking(N, L, s.mask_ratio, device=device)
    ids_restore = info.ids_restore
    vis = N * (cls + K) * D * x_vis.element_size()
    full = N * (cls + L) * D * 4  # fp32 result (bf16 tokens meet fp32 parameters), as in the decoders
    moved = 2 * vis + 2 * full + 2 * N * L * 8 + (cls + L) * D * 4  # ids_restore read both ways, pos_embed forward
    case = Case(f"{s.name}/restore fwd+bwd", bytes=moved, meta={"N": N, "L": L, "K": K, "D": D})

    grad_out = torch.ones(N, cls + L, D, device=device)

    def provider(fn: Callable[..., torch.Tensor], index: torch.Tensor) -> Callable[[], Any]:
        def step() -> None:
            out = fn(x_vis, index, mask_token, pos_embed)
            out.backward(grad_out)
            x_vis.grad = mask_token.grad = None

        return step

    if s.frames:
        # the official formulation selects by the boolean mask (a host synchronisation, as in VideoMAE's code)
        reference, index = reference_restore_video, info.mask.bool()
    else:
        reference, index = reference_restore, ids_restore
    compiled = torch.compile(reference, dynamic=False)
    mimfast = functools.partial(mimfast_restore, has_cls=bool(cls))
    return case, {"mimfast": provider(mimfast, ids_restore), "reference": provider(reference, index),
                  "reference+compile": provider(compiled, index), COPY_PROVIDER: copy_provider(moved, device)}


def block_case(s: Shape, device: torch.device) -> tuple[Case, dict[str, Callable[[], Any]]]:
    """BEiT block-wise masking of the image grid (40% of the patches, rectangles of at least 16): the kernel against
    the same rule drawn on the host and copied over, as a data pipeline would."""
    N, L = s.batch, s.grid
    side = s.img // s.patch
    num = int(0.4 * L)
    moved = N * ((L - num) * 8 + L * 12)  # ids_keep, ids_restore, mask written
    case = Case(f"{s.name}/block masking", bytes=moved, meta={"N": N, "L": L, "masked": num})

    def provider(backend: str) -> Callable[[], Any]:
        return lambda: block_masking(N, (side, side), num, 16, device=device, backend=backend)

    return case, {"mimfast": provider("triton"), "reference": provider("torch")}


def all_cases(quick: bool, device: torch.device, dtype: torch.dtype) -> list[tuple[Case, dict[str, Callable]]]:
    cases = []
    for s in QUICK if quick else FULL:
        cases.append(embed_case(s, device, dtype))
        cases.append(gather_case(s, device, dtype))
        if dtype != torch.float32:
            cases.append(gather_case(s, device, torch.float32, " fp32"))
        cases.append(restore_case(s, device, dtype))
        if not s.frames:
            cases.append(block_case(s, device))
    return cases


def main() -> None:
    ap = common_args(__doc__.splitlines()[0])
    args = ap.parse_args()
    device = default_device()
    dtype = getattr(torch, args.dtype)
    cases = all_cases(args.quick, device, dtype)
    rows = run(cases, device, args.providers, args.cases, profile=args.profile, graph=args.graph,
               name="bench_masking" if not args.no_save else None)
    if not args.no_save:
        write_results("bench_masking", rows, device, {"dtype": args.dtype})


if __name__ == "__main__":
    main()
