"""visible_attention: packed ragged batches and dense equal lengths, forward, backward, forward + backward.

    python -m benchmarks.bench_attention                       # MAE / VideoMAE shapes, on the GPU
    TRITON_INTERPRET=1 python -m benchmarks.bench_attention --quick --no-save   # tiny shapes, CPU smoke run

Ragged: an MAE encoder batch (256 images of 196 patches, each its own mask ratio uniform in [0.6, 0.9], so
1 + int(196 * (1 - ratio)) tokens with the cls token; ViT-B 12 heads and ViT-L 16 heads, head dim 64). Providers:
``mimfast`` (packed kernels, no padding), ``sdpa-padded`` (SDPA on the batch padded to the longest sample with a
key-padding mask, the usual way to run ragged batches without packing), ``reference`` (the per-sequence loop the
tests use) and ``xformers`` (block-diagonal mask over the packed tokens) when installed.

Equal lengths: 50 (MAE encoder), 197 (a ViT over a whole image: the MAE decoder's length) and 1568 (VideoMAE
decoder) tokens, 12 and 16 heads, head dim 64; and the MAE decoder itself, 197 tokens of 16 heads of 32 (512 wide).
Providers: ``mimfast`` (dense kernels), ``sdpa`` (PyTorch's own choice), ``sdpa-flash``, ``sdpa-cudnn``,
``sdpa-efficient`` (one backend forced each through ``torch.nn.attention.sdpa_kernel``), ``reference`` (plain
softmax math), ``reference+compile`` and ``xformers`` when installed. Whether ``auto`` should route dense input to
SDPA is decided from these rows.

Flops count useful work only, the same for every provider (padding is not counted): 4 * S^2 * d * H per sequence
forward, 2.5 times that backward. Bytes, the least the work must move: q, k, v read and out written forward (+ the
fp32 log-sum-exp written); q, k, v, dO and the log-sum-exp read and dq, dk, dv written backward (a kernel that
also reads out for delta = rowsum(dO * O), as the tiled path and SDPA's do, moves more than it is credited for).
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.harness import Case, common_args, default_device, run, write_results
from mimfast.ops.visible_attention import visible_attention, visible_attention_ref

MODES = ("fwd", "bwd", "fwd+bwd")
BWD_FLOP_FACTOR = 2.5


@dataclass(frozen=True)
class Ragged:
    name: str
    batch: int
    patches: int
    heads: int
    head_dim: int
    ratio_low: float = 0.6
    ratio_high: float = 0.9

    def lengths(self, seed: int = 0) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        ratios = torch.empty(self.batch, dtype=torch.float64).uniform_(self.ratio_low, self.ratio_high, generator=gen)
        return [1 + int(self.patches * (1 - r)) for r in ratios.tolist()]


@dataclass(frozen=True)
class Dense:
    name: str
    batch: int
    seqlen: int
    heads: int
    head_dim: int


RAGGED_FULL = [Ragged("mae_vit_b16_enc", 256, 196, 12, 64), Ragged("mae_vit_l16_enc", 256, 196, 16, 64)]
DENSE_FULL = [
    Dense("mae_enc_50", 256, 50, 12, 64),
    Dense("mae_enc_50", 256, 50, 16, 64),
    Dense("vit_197", 256, 197, 12, 64),
    Dense("vit_197", 256, 197, 16, 64),
    Dense("mae_dec_197", 256, 197, 16, 32),
    Dense("videomae_dec_1568", 32, 1568, 12, 64),
    Dense("videomae_dec_1568", 32, 1568, 16, 64),
]
RAGGED_QUICK = [Ragged("quick_ragged", 3, 16, 2, 16)]
DENSE_QUICK = [Dense("quick_dense", 2, 13, 2, 16)]


def attention_flops(lengths: list[int], heads: int, head_dim: int, mode: str) -> float:
    fwd = sum(4.0 * s * s * head_dim * heads for s in lengths)
    return {"fwd": fwd, "bwd": BWD_FLOP_FACTOR * fwd, "fwd+bwd": (1 + BWD_FLOP_FACTOR) * fwd}[mode]


def attention_bytes(tokens: int, heads: int, head_dim: int, elt: int, mode: str) -> float:
    tensor = tokens * heads * head_dim * elt
    stat = tokens * heads * 4
    fwd = 4 * tensor + stat
    bwd = 7 * tensor + stat
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def timed(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor,
          mode: str) -> Callable[[], Any]:
    """A zero-argument step running the forward, the backward of one saved forward, or both."""
    if mode == "fwd":
        return fn
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(), leaves, grad)
    saved: list[torch.Tensor] = []

    def backward_only() -> Any:
        if not saved:  # the forward runs in the timer's warm-up, so a provider that fails is reported there
            saved.append(fn())
        return torch.autograd.grad(saved[0], leaves, grad, retain_graph=True)

    backward_only.restart = saved.clear  # type: ignore[attr-defined]  # see harness.graph_time
    return backward_only


def sdpa_with(backend: Optional[Any]) -> Callable[..., torch.Tensor]:
    """SDPA on [N, S, H, d] inputs, optionally forcing one backend."""

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        ctx = contextlib.nullcontext()
        if backend is not None:
            from torch.nn.attention import sdpa_kernel

            ctx = sdpa_kernel(backend)
        with ctx:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask)
        return out.transpose(1, 2)

    return f


def xformers_ops() -> Optional[Any]:
    if importlib.util.find_spec("xformers") is None:
        return None
    import xformers.ops as xops

    return xops


def ragged_cases(s: Ragged, device: torch.device, dtype: torch.dtype) -> list[tuple[Case, dict[str, Callable]]]:
    lengths = s.lengths()
    T, S, H, d = sum(lengths), max(lengths), s.heads, s.head_dim
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q, k, v = (torch.randn(T, H, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(T, H, d, device=device, dtype=dtype)

    # padded batch [N, S, H, d]: the same tokens, each sample's rows followed by zeros
    rows = torch.cat([torch.arange(n, device=device) + i * S for i, n in enumerate(lengths)])
    padded = []
    for t in (q, k, v):
        p = torch.zeros(s.batch * S, H, d, device=device, dtype=dtype)
        p[rows] = t.detach()
        padded.append(p.view(s.batch, S, H, d).requires_grad_())
    grad_padded = torch.zeros(s.batch * S, H, d, device=device, dtype=dtype)
    grad_padded[rows] = grad
    grad_padded = grad_padded.view(s.batch, S, H, d)
    keep = torch.arange(S, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    key_mask = keep[:, None, None, :]  # [N, 1, 1, S]: every query sees its own sample's real keys
    sdpa = sdpa_with(None)
    xops = xformers_ops() if device.type == "cuda" else None
    block_diagonal = xops.fmha.BlockDiagonalMask.from_seqlens(lengths) if xops is not None else None

    out = []
    for mode in MODES:
        case = Case(f"{s.name}/H{H}/{mode}", bytes=attention_bytes(T, H, d, q.element_size(), mode),
                    flops=attention_flops(lengths, H, d, mode),
                    meta={"N": s.batch, "T": T, "max_seqlen": S, "mean_seqlen": T / s.batch, "H": H, "d": d})
        providers = {
            "mimfast": timed(lambda: visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=S, backend="triton"),
                             [q, k, v], grad, mode),
            "sdpa-padded": timed(lambda: sdpa(*padded, key_mask), padded, grad_padded, mode),
            "reference": timed(lambda: visible_attention_ref(q, k, v, cu_seqlens=cu), [q, k, v], grad, mode),
        }
        if xops is not None:
            providers["xformers"] = timed(
                lambda: xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=block_diagonal)[0],
                [q, k, v], grad, mode)
        out.append((case, providers))
    return out


def dense_cases(s: Dense, device: torch.device, dtype: torch.dtype) -> list[tuple[Case, dict[str, Callable]]]:
    N, S, H, d = s.batch, s.seqlen, s.heads, s.head_dim
    q, k, v = (torch.randn(N, S, H, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(N, S, H, d, device=device, dtype=dtype)
    leaves = [q, k, v]
    from torch.nn.attention import SDPBackend

    sdpa = {name: sdpa_with(backend) for name, backend in (
        ("sdpa", None), ("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION))}
    # the bwd rows time the backward of one saved forward many times (retain_graph=True), which a compiled backward
    # with donated buffers refuses: compile the reference without them
    from torch._functorch import config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    compiled_ref = torch.compile(visible_attention_ref, dynamic=False)
    xops = xformers_ops() if device.type == "cuda" else None

    out = []
    for mode in MODES:
        case = Case(f"{s.name}/H{H}/{mode}", bytes=attention_bytes(N * S, H, d, q.element_size(), mode),
                    flops=attention_flops([S] * N, H, d, mode), meta={"N": N, "S": S, "H": H, "d": d})
        providers = {"mimfast": timed(lambda: visible_attention(q, k, v, backend="triton"), leaves, grad, mode)}
        for name, f in sdpa.items():
            providers[name] = timed(lambda f=f: f(q, k, v), leaves, grad, mode)
        providers["reference"] = timed(lambda: visible_attention_ref(q, k, v), leaves, grad, mode)
        providers["reference+compile"] = timed(lambda: compiled_ref(q, k, v), leaves, grad, mode)
        if xops is not None:
            providers["xformers"] = timed(lambda: xops.memory_efficient_attention(q, k, v), leaves, grad, mode)
        out.append((case, providers))
    return out


def all_cases(quick: bool, device: torch.device, dtype: torch.dtype) -> list[tuple[Case, dict[str, Callable]]]:
    ragged, dense = (RAGGED_QUICK, DENSE_QUICK) if quick else (RAGGED_FULL, DENSE_FULL)
    cases = []
    for r in ragged:
        cases += ragged_cases(r, device, dtype)
    for s in dense:
        cases += dense_cases(s, device, dtype)
    return cases


def main() -> None:
    ap = common_args(__doc__.splitlines()[0])
    args = ap.parse_args()
    device = default_device()
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # the Triton interpreter computes bf16 dots wrongly; the CPU run is a smoke test
        print("CPU run: float32 instead of bfloat16")
    rows = run(all_cases(args.quick, device, dtype), device, args.providers, args.cases, profile=args.profile,
               graph=args.graph, name="bench_attention" if not args.no_save else None)
    if not args.no_save:
        write_results("bench_attention", rows, device, {"dtype": str(dtype).replace("torch.", "")})


if __name__ == "__main__":
    main()
