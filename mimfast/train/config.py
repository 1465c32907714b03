"""Configuration of a pretraining run: one frozen dataclass, built from command-line flags (no exec'd files).

Fields left at ``None`` are filled by :func:`resolve`: from the data (the demo gets a small model and a short
schedule tuned to finish in minutes on a laptop CPU) and from the method (MAE / SimMIM / VideoMAE defaults
of their papers).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from mimfast.train.optim import RECIPES

__all__ = ["PretrainConfig", "build_parser", "parse_args", "resolve", "changed_settings", "METHODS", "BACKEND_CHOICES",
           "MASK_STRATEGIES"]

METHODS = ("mae", "simmim", "videomae")
MASK_STRATEGIES = ("random", "block", "importance")
MASK_SCHEDULES = ("linear", "cosine")
BACKEND_CHOICES = ("reference", "torch", "triton", "auto")  # no op has a cuda implementation yet
PRECISIONS = ("bf16", "fp16", "fp32")

# Settings a resumed run must share with its checkpoint to reproduce the uninterrupted run.
_TRAJECTORY_SETTINGS = ("batch_size", "accum_iter", "epochs", "seed", "mask_ratio", "mask_strategy", "mask_ratio_end",
                        "mask_schedule", "mask_ratio_range", "mask_patch_size", "block_min_patches",
                        "importance_temperature", "data", "blr", "lr", "norm_pix_loss", "clip_grad", "sampling_rate",
                        "drop_path")
# What a trajectory setting missing from an older checkpoint's config stood for.
_ABSENT_MEANS: dict[str, Any] = {"drop_path": None}
# Settings of one masking variant, None when the run does not use that variant.
_VARIANT_SETTINGS = ("mask_schedule", "block_min_patches", "importance_temperature")

# MAE paper recipe; the demo overrides it (tiny data, minutes of CPU).
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "mae": dict(mask_ratio=0.75, blr=1.5e-4, epochs=400, warmup_epochs=40),
    # the published ViT-B configuration (simmim_pretrain__vit_base__img224__800ep)
    "simmim": dict(mask_ratio=0.6, blr=1e-4, epochs=800, warmup_epochs=10),
    "videomae": dict(mask_ratio=0.9, blr=1.5e-4, epochs=800, warmup_epochs=40),
}
_DEMO_DEFAULTS: dict[str, Any] = dict(
    model="mae_vit_micro_patch4", epochs=30, batch_size=64, blr=4e-3, warmup_epochs=3, log_every=5,
    save_every=500, num_workers=0,
)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that decides a run. ``epochs`` fixes the learning-rate schedule; ``max_steps`` only stops
    early, so a run stopped by ``max_steps`` and resumed with a larger one follows the same trajectory."""

    model: Optional[str] = None
    method: Optional[str] = None
    data: str = "demo"
    input_size: Optional[int] = None
    num_frames: Optional[int] = None
    sampling_rate: Optional[int] = None
    mask_patch_size: Optional[int] = None
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    batch_size: Optional[int] = None
    accum_iter: int = 1
    blr: Optional[float] = None
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    warmup_lr: Optional[float] = None
    weight_decay: float = 0.05
    warmup_epochs: Optional[int] = None
    mask_ratio: Optional[float] = None
    mask_strategy: str = "random"
    mask_ratio_end: Optional[float] = None
    mask_schedule: Optional[str] = None
    mask_ratio_range: Optional[tuple[float, float]] = None
    block_min_patches: Optional[int] = None
    importance_temperature: Optional[float] = None
    norm_pix_loss: bool = True
    clip_grad: Optional[float] = None
    drop_path: Optional[float] = None
    output_dir: Optional[str] = None
    resume: Optional[str] = None
    device: Optional[str] = None
    seed: int = 0
    save_every: Optional[int] = None
    log_every: Optional[int] = None
    num_workers: Optional[int] = None
    fsdp: bool = False
    compile: bool = False
    backend: str = "auto"
    precision: str = "bf16"
    grad_checkpointing: bool = False
    nvtx: bool = False
    eval: bool = True
    eval_max_images: int = 10_000

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mimfast.pretrain",
        description="Self-supervised pretraining (MAE, SimMIM, VideoMAE). With no arguments: a small MAE on the "
                    "embedded handwritten-digits demo data, on whatever device is present.",
    )
    a = ap.add_argument
    a("--model", default=None, help="model factory, e.g. mae_vit_base_patch16 (default: mae_vit_micro_patch4 on "
                                     "the demo data, mae_vit_base_patch16 otherwise)")
    a("--method", default=None, choices=METHODS, help="objective and masks (default: inferred from the model)")
    a("--data", default="demo", help="'demo' (embedded digits), 'synthetic' (random tensors, for benchmarks), or "
                                     "a folder: images in class sub-folders or flat; for videomae, .npy clips "
                                     "or folders of frames. A folder with train/ and val/ uses val/ as held out")
    a("--input-size", type=int, default=None, help="image side in pixels (default: the model's)")
    a("--num-frames", type=int, default=None, help="frames per clip for videomae (default: the model's)")
    a("--sampling-rate", type=int, default=None,
      help="temporal stride between sampled frames (videomae, default 4)")
    a("--mask-patch-size", type=int, default=None,
      help="SimMIM mask unit in pixels, also of its block and importance masks (default 32, 16 for --mask-strategy "
           "block; the model patch size for inputs under 128 pixels or when the unit does not divide the input)")
    a("--epochs", type=int, default=None,
      help="length of the schedule in epochs (default: mae 400, simmim 800, videomae 800; the demo 30)")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (the schedule still "
                                                  "spans --epochs)")
    a("--batch-size", type=int, default=None, help="images per process per micro-step (default 64)")
    a("--accum-iter", type=int, default=1, help="micro-steps accumulated per optimizer step")
    a("--blr", type=float, default=None,
      help="base learning rate: lr = blr * effective batch / 256 (/ 512 for simmim, as its recipe; default: mae "
           "and videomae 1.5e-4, simmim 1e-4; the demo 4e-3)")
    a("--lr", type=float, default=None, help="absolute learning rate (overrides --blr)")
    a("--min-lr", type=float, default=None,
      help="floor of the cosine (default: the method's, scaled with the batch like the rate: 0 for mae, 1e-5 x "
           "batch / 256 for videomae; simmim's step schedule has none)")
    a("--warmup-lr", type=float, default=None,
      help="rate the warm-up starts from (default: the method's, scaled likewise: 0 for mae and videomae, 5e-7 x "
           "batch / 512 for simmim)")
    a("--weight-decay", type=float, default=0.05,
      help="AdamW weight decay (not on biases, 1-D parameters and the method's official exemptions)")
    a("--warmup-epochs", type=int, default=None,
      help="epochs of linear warm-up (default: mae and videomae 40, simmim 10; the demo 3)")
    a("--mask-ratio", type=float, default=None, help="fraction of tokens masked (default per method); with "
                                                     "--mask-ratio-end the starting ratio; evaluation masks at the "
                                                     "final ratio")
    a("--mask-strategy", default="random", choices=MASK_STRATEGIES,
      help="'random': the method's own masks (MAE uniform patches, SimMIM mask units, VideoMAE tubes); 'block': "
           "BEiT-style rectangles (MAE, SimMIM); 'importance': patches kept with probability proportional to their "
           "pixel variance ** (1 / --importance-temperature) (MAE, SimMIM)")
    a("--mask-ratio-end", type=float, default=None,
      help="progressive masking: the ratio moves from --mask-ratio at step 0 to this one at the end of the "
           "schedule (--epochs)")
    a("--mask-schedule", default=None, choices=MASK_SCHEDULES,
      help="shape of the --mask-ratio-end schedule (default linear)")
    a("--mask-ratio-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
      help="MAE with random masks: each sample draws its own ratio uniformly in [LOW, HIGH] and the encoder runs "
           "on the packed visible tokens (no padding); --mask-ratio is then the evaluation ratio")
    a("--block-min-patches", type=int, default=None,
      help="smallest rectangle of --mask-strategy block, in patches (default 16)")
    a("--importance-temperature", type=float, default=None,
      help="--mask-strategy importance: towards 0 keeps the most textured patches, large values approach random "
           "(default 1)")
    a("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
      help="per-patch normalised pixel targets (MAE; VideoMAE's normalised target)")
    a("--clip-grad", type=float, default=None,
      help="clip the gradient norm to this value (default: none; 5 for simmim, as its recipe)")
    a("--drop-path", type=float, default=None,
      help="simmim: stochastic depth of the last block, rising linearly from 0 at the first (default 0.1, as its "
           "ViT recipe)")
    a("--output-dir", default=None, help="run folder (default runs/<model>-<timestamp>)")
    a("--resume", default=None, help="checkpoint path, or 'auto': the newest checkpoint of the run folder "
                                     "(with no --output-dir: of the newest runs/<model>-* folder); none found "
                                     "starts fresh")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present; the local rank's GPU "
                                     "under torchrun)")
    a("--seed", type=int, default=0)
    a("--save-every", type=int, default=None, help="checkpoint every N optimizer steps (and at each epoch end)")
    a("--log-every", type=int, default=None, help="log metrics every N optimizer steps")
    a("--num-workers", type=int, default=None,
      help="DataLoader decoding processes per rank (default 8; 0 for the demo)")
    a("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP when distributed")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--backend", default="auto", choices=BACKEND_CHOICES,
      help="'reference': the pure-PyTorch published formulation; others: mimfast's fused ops on that backend")
    a("--precision", default="bf16", choices=PRECISIONS, help="autocast dtype on CUDA (CPU always runs fp32)")
    a("--grad-checkpointing", action="store_true", help="recompute transformer blocks in the backward pass")
    a("--nvtx", action="store_true", help="NVTX ranges around data, forward, backward, optimizer (CUDA)")
    a("--eval", action=argparse.BooleanOptionalAction, default=True,
      help="after training: held-out reconstruction loss, kNN and linear probe vs random init")
    a("--eval-max-images", type=int, default=10_000, help="cap on images used per evaluation split")
    return ap


def parse_args(argv: Optional[Sequence[str]] = None) -> PretrainConfig:
    ns = build_parser().parse_args(None if argv is None else list(argv))
    if ns.mask_ratio_range is not None:
        ns.mask_ratio_range = tuple(ns.mask_ratio_range)
    return PretrainConfig(**vars(ns))


def infer_method(model: str) -> str:
    for method in METHODS:
        if model.startswith(method + "_"):
            return method
    raise ValueError(f"cannot infer the method from model {model!r}; pass --method {{{','.join(METHODS)}}}")


def resolve(config: PretrainConfig) -> PretrainConfig:
    """Fill the ``None`` fields and check the values; raises ``ValueError`` with a clear message."""
    demo = config.data == "demo"
    fill: dict[str, Any] = {}

    def default(name: str, value: Any) -> None:
        if getattr(config, name) is None and name not in fill:
            fill[name] = value

    for name, value in (_DEMO_DEFAULTS if demo else {}).items():
        default(name, value)
    model = fill.get("model", config.model) or "mae_vit_base_patch16"
    default("model", model)
    if config.method is not None and any(model.startswith(m + "_") for m in METHODS) and \
            not model.startswith(config.method + "_"):
        raise ValueError(f"--method {config.method} does not train model {model} (a {infer_method(model)} model); "
                         "leave --method out to take the model's")
    method = config.method or infer_method(model)
    default("method", method)
    for name, value in _METHOD_DEFAULTS[method].items():
        default(name, value)
    if method == "simmim":
        default("drop_path", 0.1)
    if method in METHODS and config.clip_grad is None and "clip_grad" not in fill:
        clip = RECIPES[method].clip_grad
        if clip is not None:
            fill["clip_grad"] = clip
    default("batch_size", 64)
    default("save_every", 1000)
    default("log_every", 20)
    default("num_workers", min(8, _cpus()))  # more workers than cores only contend (and DataLoader warns)
    if config.mask_ratio_range is not None:
        fill["mask_ratio_range"] = tuple(float(r) for r in config.mask_ratio_range)
    # settings of one masking variant get their default only when that variant runs, so a value given for another
    # one (even the default value) is seen by _check_masking and refused rather than ignored
    for name, value, applies in (
        ("sampling_rate", 4, method == "videomae"),
        ("mask_schedule", "linear", config.mask_ratio_end is not None),
        ("block_min_patches", 16, config.mask_strategy == "block"),
        ("importance_temperature", 1.0, config.mask_strategy == "importance"),
    ):
        if applies:
            default(name, value)
    out = dataclasses.replace(config, **fill)
    if out.output_dir is None:
        out = dataclasses.replace(out, output_dir=f"runs/{out.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check(out)
    return out


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


def _check(c: PretrainConfig) -> None:
    positive = dict(epochs=c.epochs, batch_size=c.batch_size, accum_iter=c.accum_iter, save_every=c.save_every,
                    log_every=c.log_every, eval_max_images=c.eval_max_images)
    for name, value in positive.items():
        if value is None or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("max_steps", "input_size", "num_frames", "mask_patch_size", "sampling_rate"):
        value = getattr(c, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    # settings of one method that another would ignore
    for name, methods in (("num_frames", ("videomae",)), ("sampling_rate", ("videomae",)),
                          ("mask_patch_size", ("simmim",)), ("drop_path", ("simmim",))):
        if getattr(c, name) is not None and c.method not in methods:
            raise ValueError(f"--{name.replace('_', '-')} applies to {' and '.join(methods)} only, not {c.method}")
    if c.warmup_epochs < 0 or c.num_workers < 0:
        raise ValueError("--warmup-epochs and --num-workers must be >= 0")
    if not 0.0 <= c.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {c.mask_ratio}")
    if c.mask_ratio_range is not None:
        highest = max(c.mask_ratio_range)
    else:
        highest = max(c.mask_ratio, c.mask_ratio_end if c.mask_ratio_end is not None else 0.0)
    if highest == 0.0:
        raise ValueError("the mask ratios (--mask-ratio, --mask-ratio-end, --mask-ratio-range) are all 0: nothing is "
                         "masked, so there is nothing to reconstruct (the loss is 0)")
    _check_masking(c)
    # written as "not (x > 0)" so that NaN fails too
    if not (c.blr > 0 if c.lr is None else c.lr > 0) or not math.isfinite(c.lr if c.lr is not None else c.blr):
        raise ValueError("the learning rate (--blr / --lr) must be positive and finite")
    for name in ("weight_decay", "min_lr", "warmup_lr"):
        value = getattr(c, name)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 and finite, got {value}")
    if c.min_lr is not None and c.method == "simmim":
        raise ValueError("--min-lr applies to the cosine schedules of mae and videomae; simmim's recipe steps its rate "
                         "down x0.1 at 7/8 of the run instead")
    if c.drop_path is not None and not 0.0 <= c.drop_path < 1.0:
        raise ValueError(f"--drop-path must be in [0, 1), got {c.drop_path}")
    if c.clip_grad is not None and not c.clip_grad > 0:
        raise ValueError(f"--clip-grad must be positive, got {c.clip_grad}")
    if c.method not in METHODS:
        raise ValueError(f"unknown method {c.method!r}; choose one of {', '.join(METHODS)}")


def _check_masking(c: PretrainConfig) -> None:
    if c.mask_strategy not in MASK_STRATEGIES:
        raise ValueError(f"unknown --mask-strategy {c.mask_strategy!r}; choose one of {', '.join(MASK_STRATEGIES)}")
    if c.mask_strategy != "random" and c.method == "videomae":
        raise ValueError(f"--mask-strategy {c.mask_strategy} is for images (mae, simmim); videomae masks tubes")
    if c.mask_schedule is not None and c.mask_schedule not in MASK_SCHEDULES:
        raise ValueError(f"unknown --mask-schedule {c.mask_schedule!r}; choose one of {', '.join(MASK_SCHEDULES)}")
    if c.mask_ratio_end is not None and not 0.0 <= c.mask_ratio_end < 1.0:
        raise ValueError(f"--mask-ratio-end must be in [0, 1), got {c.mask_ratio_end}")
    if c.mask_ratio_range is not None:
        low, high = c.mask_ratio_range
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"--mask-ratio-range needs 0 <= LOW <= HIGH < 1, got {low} {high}")
        if c.method != "mae" or c.mask_strategy != "random":
            raise ValueError("--mask-ratio-range (per-sample ratios) needs --method mae with --mask-strategy random")
        if c.mask_ratio_end is not None:
            raise ValueError("--mask-ratio-range and --mask-ratio-end cannot be combined")
    if c.block_min_patches is not None and c.block_min_patches < 1:
        raise ValueError(f"--block-min-patches must be positive, got {c.block_min_patches}")
    if c.importance_temperature is not None and not 0.0 < c.importance_temperature < float("inf"):
        raise ValueError(f"--importance-temperature must be positive and finite, got {c.importance_temperature}")
    # settings that would be silently ignored (resolve fills them only where they apply)
    if c.mask_schedule is not None and c.mask_ratio_end is None:
        raise ValueError("--mask-schedule shapes the ratio moving to --mask-ratio-end, which is not given")
    if c.block_min_patches is not None and c.mask_strategy != "block":
        raise ValueError("--block-min-patches applies to --mask-strategy block only")
    if c.importance_temperature is not None and c.mask_strategy != "importance":
        raise ValueError("--importance-temperature applies to --mask-strategy importance only")


def changed_settings(saved: dict[str, Any], config: PretrainConfig) -> list[tuple[str, Any, Any]]:
    """(name, value now, value saved) of each trajectory setting that differs from a checkpoint's ``config`` dict.
    A variant's setting this run leaves unset is not compared (the variant's own flag is), so a checkpoint that
    recorded, say, the block size of a run with random masks does not count as changed."""
    changed = []
    for name in _TRAJECTORY_SETTINGS:
        now = getattr(config, name)
        if now is None and name in _VARIANT_SETTINGS:
            continue
        # a setting newer than the checkpoint had its default then: drop_path did not exist (no stochastic depth)
        then = saved.get(name, _ABSENT_MEANS.get(name, now))
        if isinstance(then, list):  # a tuple setting as some serialisations give it back
            then = tuple(then)
        if name == "data" and isinstance(then, str) and isinstance(now, str) and then not in ("demo", "synthetic"):
            then, now = os.path.normpath(then), os.path.normpath(now)  # data/ and data are one folder
        if then != now:
            changed.append((name, now, then))
    return changed
