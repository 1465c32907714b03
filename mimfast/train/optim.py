"""AdamW with MAE's parameter groups and the per-iteration warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["Recipe", "RECIPES", "param_groups", "build_optimizer", "WarmupCosine", "scaled_lr"]


@dataclass(frozen=True)
class Recipe:
    """A method's optimisation settings from its official pre-training code. The base rates scale with the
    effective batch like the learning rate: rate * effective batch / ``lr_batch``."""

    lr_batch: int  # the batch size of the base rates
    betas: tuple[float, float]  # AdamW
    min_lr: float  # base floor of the cosine
    warmup_lr: float  # base rate the linear warm-up starts from
    clip_grad: Optional[float]  # gradient-norm clipping by default


RECIPES: dict[str, Recipe] = {
    "mae": Recipe(256, (0.9, 0.95), 0.0, 0.0, None),
    "simmim": Recipe(512, (0.9, 0.999), 1e-5, 1e-6, 5.0),
    "videomae": Recipe(256, (0.9, 0.95), 1e-5, 1e-6, None),
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


class WarmupCosine:
    """Sets every group's lr per optimizer step: linear from ``warmup_lr`` over ``warmup_steps``, then a half
    cosine from ``lr`` down to ``min_lr`` at ``total_steps``. :meth:`step` is called after each optimizer step.

    Equivalent::

        lr(s) = warmup_lr + (lr - warmup_lr) * s / warmup                           s < warmup
        lr(s) = min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))  otherwise
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int,
                 min_lr: float = 0.0, warmup_lr: float = 0.0) -> None:
        self.optimizer = optimizer
        self.lr, self.min_lr, self.warmup_lr = lr, min_lr, warmup_lr
        self.total_steps, self.warmup_steps = max(1, total_steps), min(warmup_steps, total_steps)
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

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
                "warmup_steps": self.warmup_steps, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Only the position is restored: the rates and lengths stay those this schedule was built with, from the
        run's current settings (equal to the saved ones unless, say, ``--epochs`` changed on resume: then the run
        continues on the new schedule instead of the finished old one)."""
        self.last_step = int(state["last_step"])
        self._apply()
