"""End-to-end MAE training step: forward + backward + fused AdamW step, bf16 autocast, reference vs fused.

    python -m benchmarks.bench_e2e                                   # ViT-B/16 and ViT-L/16, batch 256, on the GPU
    python -m benchmarks.bench_e2e --batch-size 128 --cases vit_l16   # one case, another batch
    python -m benchmarks.bench_e2e --quick --no-save                  # micro model, batch 4, 32 px: CPU smoke run
    python -m benchmarks.bench_e2e --quick --no-save --providers reference+compile,mimfast+compile   # minutes on CPU

One step of MAE pretraining as the training engine runs it: images fp32 [N, 3, 224, 224], mask ratio 0.75,
norm_pix loss, the forward under ``torch.autocast(bfloat16)``, ``loss.float().backward()``, AdamW (betas 0.9 /
0.95, weight decay 0.05, ``fused=True`` on CUDA, from :func:`mimfast.train.optim.build_optimizer`), then
``zero_grad(set_to_none=True)``. A fixed ``noise`` tensor fixes the mask, so every provider does the same work.
Cases: ``mae_vit_base_patch16`` and ``mae_vit_large_patch16`` (decoder 512 wide, 8 deep).

Providers: ``reference`` (``model.fused = False``: the plain PyTorch formulation, eager), ``reference+compile``
(the same under ``torch.compile``), ``mimfast`` (``model.fused = True`` inside ``mimfast.backend.use("auto")``,
eager) and ``mimfast+compile`` (the same under ``torch.compile``). Each provider gets its own model, built from
the same seed, compiled and warmed up (optimizer state created, kernels tuned) before it is timed, and freed
before the next one is built, so a row's memory is its own.

Flops: the model FLOPs of :func:`mimfast.train.metrics.train_flops_per_sample` (3x the forward FLOPs of the
reference formulation, as the engine's MFU counts them) times the batch, so the harness's TFLOP/s is model FLOP/s
and its "% peak" is that against the 800 TFLOP/s bf16 matmul rate measured on the H100. ``mfu_pct`` in the extra
column is the usual MFU, against the datasheet's dense bf16 peak (989 TFLOP/s on an H100 SXM), the figure the
engine logs and the published MFU anchors use; none on a device whose peak is unknown. ``peak MB`` is the step's
memory above what stays resident between steps (parameters, AdamW state, the input batch); the extra column also
adds img/s and ``total_peak_mb`` (resident + step peak: what must fit on the device).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from benchmarks.harness import (
    BF16_MATMUL_FLOPS_PER_S,
    Case,
    Row,
    common_args,
    default_device,
    format_row,
    run,
    write_results,
)
from mimfast.backend import use
from mimfast.train.metrics import peak_flops, train_flops_per_sample
from mimfast.train.objectives import model_factories
from mimfast.train.optim import build_optimizer


@dataclass(frozen=True)
class E2EShape:
    name: str
    model: str  # a name of mimfast.train.objectives.model_factories()
    img: int
    mask_ratio: float = 0.75


FULL = [E2EShape("mae_vit_b16", "mae_vit_base_patch16", 224), E2EShape("mae_vit_l16", "mae_vit_large_patch16", 224)]
QUICK = [E2EShape("quick_mae_micro", "mae_vit_micro_patch4", 32)]
FULL_BATCH, QUICK_BATCH = 256, 4

# provider -> (model.fused, torch.compile)
PROVIDERS = {
    "reference": (False, False),
    "reference+compile": (False, True),
    "mimfast": (True, False),
    "mimfast+compile": (True, True),
}

BLR, WEIGHT_DECAY = 1.5e-4, 0.05  # the MAE recipe; lr = blr * batch / 256
SEED = 0
WARMUP_STEPS = 3  # the first compiles, creates the AdamW state and tunes kernels; the rest settle the allocator


def build_model(s: E2EShape, fused: bool, device: torch.device) -> nn.Module:
    torch.manual_seed(SEED)  # same weights for every provider
    model = model_factories()[s.model](img_size=s.img, norm_pix_loss=True, fused=fused)
    return model.to(device).train()


class TrainStep:
    """One provider's model, optimizer and inputs; each call runs one training step."""

    def __init__(self, s: E2EShape, fused: bool, compiled: bool, imgs: torch.Tensor, noise: torch.Tensor,
                 amp_dtype: Optional[torch.dtype]) -> None:
        self.model = build_model(s, fused, imgs.device)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.optimizer = build_optimizer(self.model, BLR * imgs.shape[0] / 256, WEIGHT_DECAY, imgs.device)
        self.imgs, self.noise, self.mask_ratio = imgs, noise, s.mask_ratio
        self.fused, self.amp_dtype = fused, amp_dtype

    def _backend(self) -> Any:
        # as the engine: the reference path runs outside any backend selection, the fused one under "auto"
        return use("auto") if self.fused else contextlib.nullcontext()

    def __call__(self) -> None:
        amp = (torch.autocast(self.imgs.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp, self._backend():
            loss = self.forward(self.imgs, self.mask_ratio, self.noise).loss
        with self._backend():
            loss.float().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def flops_per_image(s: E2EShape, device: torch.device) -> tuple[float, int]:
    """(model FLOPs of one training step per image, counted as the training engine counts them; tokens L)."""
    model = build_model(s, False, device)
    x = torch.zeros(1, 3, s.img, s.img, device=device)
    noise = torch.rand(1, model.num_patches, device=device)
    return train_flops_per_sample(model, lambda: model(x, s.mask_ratio, noise), 1), model.num_patches


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def resident_mb(device: torch.device) -> Optional[float]:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


def bench_shape(s: E2EShape, batch: int, device: torch.device, amp_dtype: Optional[torch.dtype],
                providers: list[str], only_cases: Optional[str], rep_ms: int, profile: bool = False) -> list[Row]:
    name = f"{s.name}/bs{batch}/{s.img}px/train_step"
    if only_cases is not None and not any(w in name for w in only_cases.split(",")):
        return []
    per_image, L = flops_per_image(s, device)
    release(device)
    case = Case(name, flops=per_image * batch, meta={"model": s.model, "N": batch, "img": s.img, "L": L,
                                                     "mask_ratio": s.mask_ratio, "flops_per_image": per_image})
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    imgs = torch.randn(batch, 3, s.img, s.img, generator=gen).to(device)
    noise = torch.rand(batch, L, generator=gen).to(device)
    rows = []
    for provider in providers:
        fused, compiled = PROVIDERS[provider]
        step: Optional[TrainStep] = None
        try:
            step = TrainStep(s, fused, compiled, imgs, noise, amp_dtype)
            for _ in range(WARMUP_STEPS):
                step()
            release(device)
            resident = resident_mb(device)
            # compiled and warmed up above, and reset after each compiled provider below
            row = run([(case, {provider: step})], device, rep_ms=rep_ms, profile=profile, reset_dynamo=False)[0]
        except Exception as e:  # a provider that fails to build or warm up is reported, not fatal
            row = Row(case.name, provider, float("nan"), float("nan"), float("nan"), None, None, None, None, None,
                      error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
            print(format_row(row), flush=True)
            resident = None
        if row.error is None:
            img_s = batch / (row.ms_median / 1000)
            row.extra["img_per_s"] = img_s
            datasheet = peak_flops(device, "bf16")
            if datasheet is not None:
                row.extra["mfu_pct"] = 100 * img_s * per_image / datasheet
            if resident is not None and row.peak_mem_mb is not None:
                row.extra["total_peak_mb"] = resident + row.peak_mem_mb
            print(f"{'':<34} {provider:<22} {img_s:9.1f} img/s  "
                  f"{100 * img_s * per_image / BF16_MATMUL_FLOPS_PER_S:5.1f}% of 800 TFLOP/s"
                  + (f", MFU {row.extra['mfu_pct']:5.1f}%" if "mfu_pct" in row.extra else "")
                  + (f"  total peak {row.extra['total_peak_mb']:8.1f} MB" if "total_peak_mb" in row.extra else ""),
                  flush=True)
        rows.append(row)
        del step
        if compiled:
            torch._dynamo.reset()  # drop the compiled graphs with the model they guard on
        release(device)
    return rows


def main() -> None:
    ap = common_args(__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=None,
                    help=f"images per step (default {FULL_BATCH}; {QUICK_BATCH} with --quick)")
    args = ap.parse_args()
    device = default_device()
    if args.dtype == "float16":
        ap.error("bench_e2e times bf16 autocast (or float32): fp16 training needs loss scaling, not measured here")
    if args.graph:
        ap.error("--graph is for single ops: a whole training step keeps the device busy for tens of milliseconds, "
                 "so its median is already device time")
    amp_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    if device.type == "cpu" and amp_dtype is not None:
        amp_dtype = None  # CPU runs are smoke tests of the script, not measurements: no CPU bf16 autocast
        print("CPU run: float32, no autocast")
    shapes, batch = (QUICK, QUICK_BATCH) if args.quick else (FULL, FULL_BATCH)
    batch = args.batch_size or batch
    keep = args.providers.split(",") if args.providers else list(PROVIDERS)
    if args.quick and device.type == "cpu" and not args.providers:
        # compiling on CPU takes minutes; name the +compile providers with --providers to smoke-run them too
        keep = [p for p in keep if not PROVIDERS[p][1]]
        print(f"CPU quick run: providers {', '.join(keep)}")
    unknown = [p for p in keep if p not in PROVIDERS]
    if unknown:
        ap.error(f"unknown providers {unknown}; choose from {', '.join(PROVIDERS)}")
    rep_ms = 300 if args.quick else 2000  # a step takes tens of milliseconds: enough repetitions for p20 / p80
    rows: list[Row] = []
    for s in shapes:
        rows += bench_shape(s, batch, device, amp_dtype, keep, args.cases, rep_ms, args.profile)
    if not args.no_save:
        write_results("bench_e2e", rows, device, {"dtype": "bfloat16 autocast" if amp_dtype else "float32"})


if __name__ == "__main__":
    main()
