"""AdamW with the methods' parameter groups, and their per-iteration learning-rate schedules."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["Recipe", "RECIPES", "param_groups", "build_optimizer", "LRSchedule", "SCHEDULES", "scaled_lr"]


@dataclass(frozen=True)
class Recipe:
    """A method's optimisation settings from its official pre-training code. The base rates scale with the
    effective batch like the learning rate: rate * effective batch / ``lr_batch``."""

    lr_batch: int  # the batch size of the base rates
    betas: tuple[float, float]  # AdamW
    min_lr: float  # base floor of the cosine
    warmup_lr: float  # base rate the linear warm-up starts from
    clip_grad: Optional[float]  # gradient-norm clipping by default
    schedule: str  # how the rate moves per step: a kind of LRSchedule
    decay_at: tuple[float, ...] = ()  # "multistep": fractions of the run where the rate is multiplied by gamma
    gamma: float = 0.1
    # with gradient accumulation, clip the running gradient sum after every micro-batch's backward (each already
    # averaged over the processes), not once before the update
    clip_each_micro_batch: bool = False


RECIPES: dict[str, Recipe] = {
    # main_pretrain.py + util/lr_sched.py: warm-up from 0, then a half cosine over the remaining steps
    "mae": Recipe(256, (0.9, 0.95), 0.0, 0.0, None, "cosine"),
    # the ViT-B 800-epoch configuration: rates per 512 images, warm-up from 5e-7, x0.1 at epoch 700 (7/8 of the
    # run), timm's per-update stepping
    "simmim": Recipe(512, (0.9, 0.999), 0.0, 5e-7, 5.0, "timm_multistep", decay_at=(7 / 8,),
                     clip_each_micro_batch=True),
    # utils.cosine_scheduler: warm-up by np.linspace(0, lr, warmup steps), which ends on lr, then the cosine
    "videomae": Recipe(256, (0.9, 0.95), 1e-5, 0.0, None, "linspace_cosine"),
}


def scaled_lr(blr: float, effective_batch: int, lr_batch: int = 256) -> float:
    """The linear scaling rule: lr = blr * effective batch / ``lr_batch`` (256 for MAE and VideoMAE, 512 for
    SimMIM)."""
    return blr * effective_batch / lr_batch


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay on every trainable parameter except 1-D ones (LayerNorm, ...), biases and those
    the model's ``no_weight_decay()`` names (each method's official exemptions: SimMIM's position embedding and
    cls token, VideoMAE's mask token; none for MAE)."""
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW (betas (0.9, 0.95) as MAE and VideoMAE; SimMIM's are (0.9, 0.999)), the fused CUDA implementation on
    GPU."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas,
                             fused=device.type == "cuda")


SCHEDULES = ("cosine", "linspace_cosine", "timm_cosine", "timm_multistep")


class LRSchedule:
    """Sets every group's lr per optimizer step, as one of the official schedules (:meth:`step` is called after
    each optimizer step; step s is the (s + 1)-th update). W = warm-up steps, T = total steps:

    ``cosine`` (MAE's util/lr_sched)::

        lr(s) = warmup_lr + (lr - warmup_lr) * s / W                                    s < W
        lr(s) = min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (s - W) / (T - W)))       otherwise

    ``linspace_cosine`` (VideoMAE's utils.cosine_scheduler): the warm-up is ``linspace(warmup_lr, lr, W)``, which
    reaches lr on its last step (warmup_lr + (lr - warmup_lr) * s / (W - 1)); the cosine is the same.

    ``timm_cosine`` / ``timm_multistep`` (SimMIM's timm schedulers, counted in micro-batches as its loop counts
    them, ``accum`` per step, and stepped after each update with the index of the update's last micro-batch, so
    update s >= 1 runs at the rate of micro-batch t = s * accum - 1 and update 0 at that of t = 0)::

        rate(t) = warmup_lr + (lr - warmup_lr) * t / (W * accum)                        t < W * accum
        timm_cosine:    min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * t / (T * accum)))  (the warm-up included)
        timm_multistep: lr * gamma ** (number of milestones <= t), milestones = decay_at * T * accum, rounded to
                        whole epochs of ``epoch_steps`` steps
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int,
                 min_lr: float = 0.0, warmup_lr: float = 0.0, *, kind: str = "cosine", decay_at: tuple[float, ...] = (),
                 gamma: float = 0.1, accum: int = 1, epoch_steps: int = 1) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
        self.optimizer = optimizer
        self.lr, self.min_lr, self.warmup_lr = lr, min_lr, warmup_lr
        # a warm-up longer than the run is kept as given: the run ends part-way up it, as the published loops do
        self.total_steps, self.warmup_steps = max(1, total_steps), max(0, warmup_steps)
        self.kind, self.gamma, self.accum = kind, gamma, max(1, accum)
        # milestones on whole epochs (``epoch_steps`` steps each), as SimMIM's epoch x iterations per epoch, in the
        # schedule's own unit (micro-batches for the timm kinds)
        epoch_steps = max(1, epoch_steps)
        self.milestones = sorted(round(f * self.total_steps / epoch_steps) * epoch_steps * self.accum
                                 for f in decay_at)
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if self.kind.startswith("timm"):
            return self._timm_rate(max(step * self.accum - 1, 0))
        W = self.warmup_steps
        if step < W:
            span = W - 1 if self.kind == "linspace_cosine" else W
            # np.linspace(start, lr, 1) is [start]
            return self.warmup_lr + (self.lr - self.warmup_lr) * (step / span if span > 0 else 0.0)
        span = self.total_steps - W
        progress = min(1.0, (step - W) / span) if span > 0 else 1.0
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _timm_rate(self, t: int) -> float:
        W, T = self.warmup_steps * self.accum, self.total_steps * self.accum
        if t < W:
            return self.warmup_lr + (self.lr - self.warmup_lr) * t / W
        if self.kind == "timm_multistep":
            return self.lr * self.gamma ** bisect.bisect_right(self.milestones, t)
        if t >= T:  # past its one cycle timm holds the floor
            return self.min_lr
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t / T))

    def current_lr(self) -> float:
        return self.lr_at(self.last_step)

    def _apply(self) -> None:
        value = self.lr_at(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "min_lr": self.min_lr, "warmup_lr": self.warmup_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "kind": self.kind, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Only the position is restored: the rates and lengths stay those this schedule was built with, from the
        run's current settings (equal to the saved ones unless, say, ``--epochs`` changed on resume: then the run
        continues on the new schedule instead of the finished old one)."""
        self.last_step = int(state["last_step"])
        self._apply()
