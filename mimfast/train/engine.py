"""The pretraining loop behind ``python -m mimfast.pretrain``.

One function, :func:`train`, runs a whole job: data, model, optimizer, resume, the step loop with gradient
accumulation, autocast, clipping, logging and checkpoints, then the pictures and the evaluation. The same code
runs as one process or under torchrun (DDP or FSDP2); rank 0 writes every file.

Reproducibility: the data order is a function of (seed, epoch), augmentations and masks of (seed, epoch, sample
index), and the learning rate of the optimizer step. A checkpoint holds the step; resuming restarts the
sampler at the same position of the same epoch, so an interrupted and resumed run follows the loss trajectory
of an uninterrupted one, and a data-parallel run trains on the same global batches, with the same masks, as
one process with the whole batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from mimfast.data.datasets import DataError, DigitsDemo, ImageFolder, SyntheticData, VideoFolder
from mimfast.data.loader import Batch, EpochBatchSampler, make_loader
from mimfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ClipTransform, ImageTransform
from mimfast.train import checkpoint as ckpt
from mimfast.train.config import PretrainConfig, changed_settings, resolve
from mimfast.train.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown,
    transformer_blocks,
    wrap_model,
)
from mimfast.train.masks import EVAL_EPOCH
from mimfast.train.metrics import MetricsLog, mfu, peak_flops, peak_memory_mb, read_metrics, train_flops_per_sample
from mimfast.train.objectives import Objective, build_model
from mimfast.train.optim import RECIPES, LRSchedule, build_optimizer, scaled_lr
from mimfast.train.visualize import save_loss_curve, save_reconstructions

__all__ = ["train", "RunResult", "build_datasets", "enable_grad_checkpointing"]


@dataclasses.dataclass
class RunResult:
    """What :func:`train` returns: the run folder, the last optimizer step, why it stopped, the evaluation."""

    output_dir: str
    step: int
    stopped_by: Optional[str]
    eval: Optional[dict[str, Any]]


# ----------------------------------------------------------------------------------------------- data


def _channels(config: PretrainConfig) -> int:
    return 1 if config.data == "demo" else 3


def build_datasets(config: PretrainConfig, objective: Objective, device: torch.device) -> tuple[Any, Any, Any, str]:
    """(training set, the same images with the evaluation transform, held-out set or None, held-out name).

    Folders with ``train/`` and ``val/`` sub-folders use ``val/`` as the held-out set; other folders have none
    (the evaluation then reads training images and says so)."""
    shape = objective.input_shape()
    size = shape[-1]
    if config.data == "demo":
        if objective.method == "videomae":
            raise DataError("the demo data are still images; videomae needs clips (--data DIR of videos, or "
                            "--data synthetic)")
        if size != 32 or shape[0] != 1:
            raise DataError(f"the demo digits are 1-channel {32}x{32} images; model {config.model} expects "
                            f"{shape[0]}-channel {size}x{size} input (use --input-size 32 and a patch size that "
                            "divides 32)")
        return DigitsDemo("train", size), DigitsDemo("train", size), DigitsDemo("heldout", size), "held-out"
    if config.data == "synthetic":
        data = SyntheticData(shape, seed=config.seed, device=device)
        return data, data, None, "train"
    root = config.data
    train_root, val_root = os.path.join(root, "train"), os.path.join(root, "val")
    has_split = os.path.isdir(train_root) and os.path.isdir(val_root)
    if has_split:
        root = train_root
    if objective.method == "videomae":
        def make(r: str, train: bool, classes: Optional[list[str]] = None) -> VideoFolder:
            tf = ClipTransform(size, shape[0], IMAGENET_MEAN, IMAGENET_STD, train=train)
            return VideoFolder(r, tf, objective.num_frames, config.sampling_rate, seed=config.seed, classes=classes)
    else:
        def make(r: str, train: bool, classes: Optional[list[str]] = None) -> ImageFolder:
            build = ImageTransform.simmim if objective.method == "simmim" else ImageTransform
            return ImageFolder(r, build(size, shape[0], IMAGENET_MEAN, IMAGENET_STD, train=train),
                               seed=config.seed, classes=classes)
    train_set = make(root, True)
    # held-out labels index the training split's classes, so both splits number a class alike (an unlabelled
    # training split has none: its probes are skipped)
    heldout = make(val_root, False, train_set.classes or None) if has_split else None
    return train_set, make(root, False), heldout, "held-out" if has_split else "train"


# ---------------------------------------------------------------------------------------------- model


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute every transformer block's activations in the backward pass instead of storing them. Only the
    instances' ``forward`` change; parameters and state-dict keys stay as they are."""
    for block in transformer_blocks(model):
        block.forward = functools.partial(_checkpointed, block.forward)


def _model_state(model: nn.Module, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict: on rank 0 only and in host memory (for checkpoints), or with
    ``every_rank`` on every rank and on the model's device (an FSDP-sharded model gives rank 0 alone the full
    tensors when offloading to the CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not every_rank))


def _load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------------------- the trainer


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and leaves at the next step boundary. A second
    signal gets the default behaviour."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handler)
        try:
            yield
        finally:
            for s, h in self._previous.items():
                signal.signal(s, h)


def _nvtx(enabled: bool, name: str) -> Any:
    return torch.cuda.nvtx.range(name) if enabled else contextlib.nullcontext()


class Trainer:
    def __init__(self, config: PretrainConfig, info: DistInfo, device: torch.device) -> None:
        self.info, self.device = info, device
        self.config = config
        if config.backend == "triton":
            from mimfast.backend import triton_reasons

            reasons = triton_reasons([device])
            if reasons:
                raise SetupError(f"--backend triton cannot run on {device}: {'; '.join(reasons)}")
        self.main = self.info.is_main
        self.out_dir = config.output_dir
        self.nvtx = config.nvtx and self.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[config.precision]
        if self.device.type != "cuda":
            self.amp_dtype = None  # CPU runs fp32

        torch.manual_seed(config.seed)
        self.model = build_model(config, _channels(config)).to(self.device)
        self.objective = Objective(config, self.model)
        self.train_set, self.train_eval_set, self.heldout_set, self.heldout_name = build_datasets(
            config, self.objective, self.device)
        world, B, accum = self.info.world_size, config.batch_size, config.accum_iter
        self.sampler = EpochBatchSampler(len(self.train_set), B, seed=config.seed, world_size=world,
                                         rank=self.info.rank)
        self.steps_per_epoch = len(self.sampler) // accum
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.train_set)} training samples cannot fill one optimizer step of "
                            f"{B * world * accum} samples (batch {B} x {world} processes x accum {accum}); lower "
                            "--batch-size / --accum-iter")
        self.loader = make_loader(self.train_set, self.sampler, config.num_workers,
                                  pin_memory=self.device.type == "cuda")
        self.total_steps = config.epochs * self.steps_per_epoch
        self.objective.total_steps = self.total_steps
        self.last_step = min(self.total_steps, config.max_steps or self.total_steps)
        self.samples_per_step = B * world * accum

        self.flops_at = self._count_flops()
        self.range_flops: Optional[float] = None  # with --mask-ratio-range, computed once by _step_flops
        self.flops_per_sample = self._step_flops(0)
        self.peak = peak_flops(self.device, config.precision)
        self.model_keys = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        if config.grad_checkpointing:
            enable_grad_checkpointing(self.model)
        self.ddp_model = wrap_model(self.model, self.info, self.device, config.fsdp)
        if config.fsdp and not self.info.distributed:
            self._log("note: --fsdp shards over the processes of a torchrun launch; this single process trains the "
                      "whole model")
        self.step_model = self.ddp_model
        moving_ratio = config.mask_ratio_end is not None or config.mask_ratio_range is not None
        if config.compile and config.method == "mae" and moving_ratio:
            # MAE's forward takes the ratio (SimMIM and VideoMAE take masks): one that moves with the step, or one
            # per sample, is a new constant for a compiled whole model at every step, which recompiles until dynamo
            # gives up and runs it eagerly; compile the transformer blocks instead, whose inputs keep their shapes
            # (or vary in one dimension, which turns dynamic)
            for block in transformer_blocks(self.model):
                block.compile()
            self._log("note: --compile with a moving or per-sample MAE mask ratio compiles each transformer block, "
                      "not the whole model")
        elif config.compile:
            self.step_model = torch.compile(self.ddp_model)

        # the method's official recipe: rates scaled with the effective batch, AdamW betas
        recipe = RECIPES[config.method]
        lr = config.lr if config.lr is not None else scaled_lr(config.blr, self.samples_per_step, recipe.lr_batch)
        def rate(flag: str, given: Optional[float], base: float) -> float:
            # the recipe's base rate, scaled like lr and never above it (a small --lr lowers it); a given one as is
            if given is None:
                return min(lr, scaled_lr(base, self.samples_per_step, recipe.lr_batch))
            if given > lr:
                raise ValueError(f"--{flag} {given:.3g} is above the learning rate {lr:.3g}")
            return given

        min_lr = rate("min-lr", config.min_lr, recipe.min_lr)
        warmup_lr = rate("warmup-lr", config.warmup_lr, recipe.warmup_lr)
        self.optimizer = build_optimizer(self.model, lr, config.weight_decay, self.device, recipe.betas)
        self.schedule = LRSchedule(self.optimizer, lr, self.total_steps, config.warmup_epochs * self.steps_per_epoch,
                                   min_lr, warmup_lr, kind=recipe.schedule, decay_at=recipe.decay_at,
                                   gamma=recipe.gamma, accum=config.accum_iter, epoch_steps=self.steps_per_epoch)
        # SimMIM's loop clips the accumulating gradient after every backward, each one reduced over the processes
        # (its DistributedDataParallel syncs every micro-batch)
        self.clip_each_micro_batch = (config.clip_grad is not None and config.accum_iter > 1
                                      and recipe.clip_each_micro_batch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        try:
            self.metrics = MetricsLog(os.path.join(self.out_dir, "metrics.jsonl"), enabled=self.main)
        except OSError as e:  # the first write into the run folder
            raise SetupError(f"cannot write the run folder {self.out_dir} ({e.strerror or type(e).__name__}: "
                             f"{e.filename or self.out_dir})") from e
        self.skipped_before = 0  # unreadable files skipped by all ranks before the resumed checkpoint
        # the logging window a checkpoint was saved in the middle of: (loss sum, readable micro-batches) of every
        # rank (on rank 0; zeros elsewhere) and its steps, continued by a resumed run so its records repeat those
        # of an uninterrupted one
        self.resumed_window: tuple[float, float, int] = (0.0, 0.0, 0)
        self.saved_step: Optional[int] = None  # step of the checkpoint in the run folder, if any
        self.skipped_here = 0  # by this rank since this process started
        self.stop = _StopFlag()

    # -- set-up helpers

    def _count_flops(self) -> Callable[[float], float]:
        """Model FLOPs of one training sample as a function of the mask ratio. The encoder's matmul FLOPs are a
        quadratic in its visible tokens K (projections and MLP ~K, attention ~K^2) and the decoder's do not depend
        on K, so counts at three K of the ratios training uses give every ratio exactly."""
        objective = self.objective
        x = torch.zeros((1, *objective.input_shape()), device=self.device)
        idx = torch.zeros(1, dtype=torch.long)

        def count(ratio: float) -> float:
            return train_flops_per_sample(self.model, lambda: objective.forward(self.model, x, idx, 0, ratio=ratio), 1)

        low, high = objective.ratio_span()
        points: dict[Optional[int], float] = {}
        for ratio in (low, (low + high) / 2, high):
            K = objective.visible_tokens(ratio)
            if K not in points:
                points[K] = count(ratio)
        if len(points) == 1:
            value = next(iter(points.values()))
            return lambda ratio: value
        coeffs = np.polyfit(list(points), list(points.values()), min(2, len(points) - 1))
        return lambda ratio: float(np.polyval(coeffs, objective.visible_tokens(ratio)))

    def _step_flops(self, step: int) -> float:
        """Model FLOPs per sample of optimizer step ``step``: at the step's ratio, or averaged over the range
        with --mask-ratio-range (on a fine grid of ratios, each sample drawing its own)."""
        if self.config.mask_ratio_range is not None:
            if self.range_flops is None:
                grid = np.linspace(*self.config.mask_ratio_range, 1025)
                self.range_flops = float(np.mean([self.flops_at(r) for r in grid]))
            return self.range_flops
        return self.flops_at(self.objective.ratio_at(step))

    def _log(self, message: str) -> None:
        if self.main:
            from tqdm import tqdm

            tqdm.write(message)

    def resume(self) -> None:
        c = self.config
        path = None
        if c.resume is not None:
            path = ckpt.find_resume_checkpoint(self.out_dir, c.model) if c.resume == "auto" else c.resume
        if path is None:
            if c.resume is not None:
                self._log(f"--resume auto: no checkpoint in {self.out_dir}, starting from scratch")
            self.metrics.truncate_after(0)  # records of a run stopped before its first checkpoint
            return
        state = ckpt.load_checkpoint(path)
        ckpt.check_resumable(state, path)
        ckpt.check_compatible(state, c.model, c.method, self.model_keys, path)
        for name, now, then in changed_settings(state.get("config", {}), c):
            self._log(f"warning: resuming with --{name.replace('_', '-')} {now!r}, the checkpoint was written with "
                      f"{then!r}; the run will not reproduce an uninterrupted one")
        if state.get("world_size", self.info.world_size) != self.info.world_size:
            self._log(f"note: checkpoint written by {state['world_size']} processes, resuming with "
                      f"{self.info.world_size}")
        _load_model_state(self.model, state["model"])
        self._load_optimizer(state["optimizer"])
        saved_schedule = state["scheduler"]
        self.schedule.load_state_dict(saved_schedule)
        now = self.schedule.state_dict()
        moved = [k for k in ("lr", "min_lr", "warmup_lr", "total_steps", "warmup_steps")
                 if k in saved_schedule and not math.isclose(float(saved_schedule[k]), float(now[k]), rel_tol=1e-9)]
        changes = [f"{k} {saved_schedule[k]:.4g} -> {now[k]:.4g}" for k in moved]
        saved_kind = saved_schedule.get("kind", "cosine")  # checkpoints before the per-method kinds used MAE's
        if saved_kind != now["kind"]:
            changes.append(f"kind {saved_kind} -> {now['kind']}")
        if changes:
            self._log("warning: the learning-rate schedule differs from the checkpoint's ("
                      + ", ".join(changes)
                      + "); the run continues on this one from step " + str(self.schedule.last_step))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.saved_step = self.step
        self.skipped_before = int(state.get("skipped_total", 0))
        window = state.get("window") or {}
        if window.get("steps"):
            total = (float(window["loss_sum"]), float(window["readable"])) if self.info.rank == 0 else (0.0, 0.0)
            self.resumed_window = (*total, int(window["steps"]))
        # a partial window logged as the last record of a shortened run is logged again, whole, by this one (when it
        # trains past it)
        reopened = bool(window.get("steps") and window.get("logged")) and self.step < self.last_step
        self.metrics.truncate_after(self.step - 1 if reopened else self.step)
        self._log(f"resumed from {path} at step {self.step} (epoch {self.step // self.steps_per_epoch})")
        if self.step >= self.last_step:
            limit = f"--max-steps {self.config.max_steps}" if self.last_step < self.total_steps else \
                f"the schedule's {self.total_steps} steps (--epochs {self.config.epochs})"
            self._log(f"note: the checkpoint is already at or past {limit}: nothing left to train")

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # the implementation flags follow this machine, and the hyperparameters this run's recipe (a checkpoint of
        # an earlier recipe brings its own, and may group the parameters differently): only the moments and step
        # counts come from the checkpoint
        kept = [{k: g.get(k) for k in ("fused", "foreach", "betas", "weight_decay", "eps")}
                for g in self.optimizer.param_groups]
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
        def value(v: Any) -> Any:
            return tuple(v) if isinstance(v, (list, tuple)) else v  # betas come back from a checkpoint as a list

        changed = sorted({k for g, own in zip(self.optimizer.param_groups, kept) for k in ("betas", "weight_decay")
                          if value(g[k]) != value(own[k])})
        for g, own in zip(self.optimizer.param_groups, kept):
            g.update(own)
        if changed:
            self._log(f"warning: the checkpoint's optimizer used other {' and '.join(changed)} for some parameters; "
                      "the run continues with this version's")

    def _nonfinite_weights(self) -> int:
        """Parameters holding a NaN or an infinity, on every rank (a collective call under torchrun)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        bad = torch.stack([~torch.isfinite(p.detach()).all() for p in local]).sum().float() if local else \
            torch.zeros((), device=self.device)
        return int(all_reduce_sum(bad.to(self.device), self.info))

    def save(self, window: tuple[Optional[torch.Tensor], float, int] = (None, 0.0, 0), logged: bool = False) -> None:
        """Write the checkpoint (atomically) with the open logging ``window`` (loss sum on the device, readable
        micro-batches of this rank, steps; ``logged``: its record is already written, as the last of a shortened
        run). Weights or a window loss that are not finite raise a FloatingPointError instead, and the checkpoint
        already in the run folder stays as it was."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        loss, readable, steps = window
        loss = loss if loss is not None else torch.zeros((), device=self.device)
        window_total = all_reduce_sum(torch.stack([loss.detach().float().reshape(()),
                                                   torch.tensor(float(readable), device=self.device)]), self.info)
        loss_sum, window_readable = window_total.tolist()
        bad = self._nonfinite_weights()
        if bad or not math.isfinite(loss_sum):
            kept = f"the checkpoint of step {self.saved_step} is kept" if self.saved_step is not None else \
                "no checkpoint was written"
            what = f"{bad} parameter tensors hold NaN or infinite values" if bad else f"the loss is {loss_sum}"
            raise FloatingPointError(f"{what} at step {self.step}; {kept}. Lower the learning rate (--blr) or clip "
                                     "gradients (--clip-grad)")
        skipped = self._skipped_total()
        model_state = _model_state(self.model)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.main:
            state = {
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": self.step,
                "epoch": self.step // self.steps_per_epoch,
                "rng": ckpt.rng_state(),
                "config": self.config.to_dict(),
                "world_size": self.info.world_size,
                "skipped_total": skipped,
                "window": {"loss_sum": loss_sum, "readable": window_readable, "steps": steps, "logged": logged},
            }
            ckpt.atomic_save(state, os.path.join(self.out_dir, ckpt.CHECKPOINT_NAME))
        self.saved_step = self.step
        barrier(self.info)

    # -- the step

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _backend(self) -> Any:
        if self.config.backend == "reference":
            return contextlib.nullcontext()
        from mimfast.backend import use

        return use(self.config.backend)

    def _micro_batch(self, it: Iterator[Batch]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Next (images on the device, data-set indices on the host, weight); an all-unreadable batch becomes one
        zero sample with weight 0, so every rank still runs the same forward / backward collectives."""
        with _nvtx(self.nvtx, "data"):
            batch = next(it)
        if batch.skipped:
            self.skipped_here += len(batch.skipped)
            for path in batch.skipped[:3]:
                self._log(f"skipped unreadable file {path}")
        if batch.images.numel() == 0:
            x = torch.zeros((1, *self.objective.input_shape()), device=self.device)
            return x, torch.zeros(1, dtype=torch.long), 0.0
        images = batch.images.to(self.device, non_blocking=True)
        return images, batch.indices, 1.0

    def _sync_context(self, last_micro: bool) -> Any:
        if self.config.accum_iter == 1 or not self.info.distributed:
            return contextlib.nullcontext()
        if self.clip_each_micro_batch:
            last_micro = True  # every micro-batch's gradient is reduced before it is clipped
        if isinstance(self.ddp_model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext() if last_micro else self.ddp_model.no_sync()
        self.model.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()

    def train_step(self, it: Iterator[Batch], epoch: int) -> tuple[torch.Tensor, float]:
        """One optimizer step over ``accum_iter`` micro-batches; returns the sum of the micro-batches' losses (a
        device scalar) and how many micro-batches had a readable image (the loss of the others is 0). A single
        process whose micro-batches were all unreadable makes no update (under torchrun every rank updates, to
        stay in step)."""
        accum = self.config.accum_iter
        total = torch.zeros((), device=self.device)
        readable = 0.0
        for micro in range(accum):
            images, indices, weight = self._micro_batch(it)
            readable += weight
            with self._sync_context(micro == accum - 1):
                with _nvtx(self.nvtx, "forward"), self._autocast(), self._backend():
                    loss = self.objective.forward(self.step_model, images, indices, epoch, self.step).loss
                with _nvtx(self.nvtx, "backward"), self._backend():
                    self.scaler.scale(loss.float() * (weight / accum)).backward()
            if self.clip_each_micro_batch and micro < accum - 1:
                # the gradients are still scaled by the fp16 loss scale (unscaled once, before the update): the
                # threshold scales with them
                scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad * scale)
            total += loss.detach().float() * weight
        if readable == 0 and not self.info.distributed:
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()  # the step still counts: the schedule and the data stay where a full run has them
            return total, readable
        with _nvtx(self.nvtx, "optimizer"):
            if self.config.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
        return total, readable

    def _skipped_total(self) -> int:
        """Unreadable files skipped so far by every rank (a collective call under torchrun)."""
        here = torch.tensor(float(self.skipped_here), device=self.device)
        return self.skipped_before + int(all_reduce_sum(here, self.info))

    def _stop_requested(self) -> bool:
        if not self.info.distributed:
            return self.stop.signal is not None
        flag = torch.tensor(1.0 if self.stop.signal else 0.0, device=self.device)
        return bool(all_reduce_mean(flag, self.info) > 0)

    # -- the loop

    def fit(self) -> Optional[str]:
        """Train up to ``last_step``; returns the name of the signal that stopped it early, if any."""
        c = self.config
        from tqdm import tqdm

        bar = tqdm(total=self.last_step, initial=self.step, disable=not self.main, dynamic_ncols=True,
                   unit="step", desc="train")
        # a window a resumed checkpoint left open goes on, so the records repeat an uninterrupted run's; img/s
        # counts only this process's steps
        loss_before, window_readable, window_steps = self.resumed_window
        window_loss = torch.full((), loss_before, device=self.device)
        timed_steps, window_start = 0, time.perf_counter()
        epoch_readable = 0.0  # micro-batches with a readable image, this rank (window_readable: the same per window)
        saved_at = self.step
        stopped_by = None
        with self.stop.installed():
            while self.step < self.last_step and stopped_by is None:
                epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch, start_step=in_epoch * c.accum_iter)
                it = iter(self.loader)
                bar.set_description(f"epoch {epoch + 1}/{c.epochs}")
                if in_epoch == 0:
                    epoch_readable = 0.0
                for _ in range(in_epoch, self.steps_per_epoch):
                    loss_sum, readable = self.train_step(it, epoch)
                    window_loss += loss_sum
                    window_readable += readable
                    epoch_readable += readable
                    self.step += 1
                    window_steps += 1
                    timed_steps += 1
                    bar.update(1)
                    end_of_epoch = self.step % self.steps_per_epoch == 0
                    regular = self.step % c.log_every == 0 or end_of_epoch
                    logged_early = False
                    if regular or self.step == self.last_step:
                        record = self._log_window(window_loss, window_readable, timed_steps,
                                                  time.perf_counter() - window_start,
                                                  epoch_readable if end_of_epoch and in_epoch == 0 else None)
                        if record["loss"] is not None:
                            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                            img_s=f"{record['img_per_s']:.0f}")
                        if regular:
                            window_loss.zero_()
                            window_readable = 0.0
                            window_steps = timed_steps = 0
                            window_start = time.perf_counter()
                        else:
                            # the last step of a shortened run (--max-steps) logs its partial window; the checkpoint
                            # keeps the window open, and a resumed run replaces that record by the whole window's
                            logged_early = True
                    if self.step % c.save_every == 0 or end_of_epoch or self.step == self.last_step:
                        self.save((window_loss, window_readable, window_steps), logged=logged_early)
                        saved_at = self.step
                    if self._stop_requested():
                        stopped_by = self.stop.signal or "signal on another rank"
                        break
                    if self.step >= self.last_step:
                        break
        bar.close()
        if stopped_by is not None:
            if saved_at != self.step:
                self.save((window_loss, window_readable, window_steps))
            self._log(f"stopped by {stopped_by} at step {self.step}; checkpoint saved in {self.out_dir} (continue "
                      f"with --resume auto --output-dir {self.out_dir})")
        return stopped_by

    def _log_window(self, loss_sum: torch.Tensor, readable: float, steps: int, seconds: float,
                    epoch_readable: Optional[float] = None) -> dict[str, Any]:
        """Log the mean loss over the window's readable micro-batches of every rank (None when it had none);
        with ``epoch_readable`` (a whole epoch's count, at its end) raise when no rank read any image in it."""
        counts = [readable] + ([epoch_readable] if epoch_readable is not None else [])
        totals = all_reduce_sum(torch.cat([loss_sum.reshape(1).float(),
                                           torch.tensor(counts, dtype=torch.float32).to(self.device)]), self.info)
        loss_total, window_count, *epoch_count = totals.tolist()
        if epoch_count and epoch_count[0] == 0:
            epoch = (self.step - 1) // self.steps_per_epoch + 1  # counted from 1, as the progress bar does
            raise DataError(f"no file of the training data could be read in epoch {epoch} ({self._skipped_total()} "
                            "skipped); check the folder's files")
        loss = loss_total / window_count if window_count else None
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.step}; lower the learning rate (--blr) or clip "
                                     "gradients (--clip-grad)")
        img_s = self.samples_per_step * steps / max(seconds, 1e-9)
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "loss": loss,
            "lr": self.schedule.lr_at(self.step - 1),  # the rate the window's last step used
            "img_per_s": img_s,
            "peak_mem_mb": peak_memory_mb(self.device),
        }
        if self.config.mask_ratio_end is not None:
            record["mask_ratio"] = self.objective.ratio_at(self.step - 1)  # of the window's last step
        util = mfu(img_s, self._step_flops(self.step - 1), self.peak, self.info.world_size)
        if util is not None:
            record["mfu"] = util
        skipped = self._skipped_total()
        if skipped:
            record["skipped_files"] = skipped
        self.metrics.write(record)
        return record

    # -- after training

    def _eval_model(self) -> nn.Module:
        """An unsharded model holding the trained weights (the training model itself unless FSDP shards it)."""
        if not (self.config.fsdp and self.info.distributed):
            return self.model
        state = _model_state(self.model, every_rank=True)  # every rank evaluates
        torch.manual_seed(self.config.seed)
        model = build_model(self.config, _channels(self.config)).to(self.device)
        model.load_state_dict(state)
        return model

    def _batches(self, dataset: Any, limit: int) -> Iterator[Batch]:
        n = len(dataset)
        indices = list(range(n)) if n <= limit else [round(i * n / limit) for i in range(limit)]
        sampler = EpochBatchSampler(n, self.config.batch_size, shuffle=False, indices=indices)
        sampler.set_epoch(EVAL_EPOCH)
        for batch in make_loader(dataset, sampler, self.config.num_workers):
            if batch.images.numel():
                yield batch

    def _features(self, model: nn.Module, dataset: Any, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of up to ``limit`` images; [0, 0] and [0] when none of them could be read."""
        feats, labels = [], []
        for batch in self._batches(dataset, limit):
            with self._autocast(), self._backend():
                feats.append(self.objective.features(model, batch.images.to(self.device)).cpu())
            labels.append(batch.labels)
        if not feats:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        return torch.cat(feats), torch.cat(labels)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out reconstruction loss against the per-patch-mean predictor, the reconstruction picture, and
        kNN / linear-probe accuracy of the trained encoder against the same encoder at its initialisation."""
        from mimfast.eval.knn import knn_accuracy
        from mimfast.eval.linear_probe import linear_probe_accuracy

        c = self.config
        model = self._eval_model()
        model.eval()
        data = self.heldout_set if self.heldout_set is not None else self.train_eval_set
        loss_sum = trivial_sum = 0.0
        count = 0
        first: Optional[Batch] = None
        for batch in self._batches(data, c.eval_max_images):
            first = first or batch
            images = batch.images.to(self.device)
            with self._autocast(), self._backend():
                out = self.objective.forward(model, images, batch.indices, EVAL_EPOCH)
                trivial = self.objective.trivial_loss(model, images, out)
            n = images.shape[0]
            loss_sum += float(out.loss) * n
            trivial_sum += float(trivial) * n
            count += n
        result: dict[str, Any] = {
            "split": self.heldout_name,
            "images": count,
            "method": c.method,
            "mask_ratio": self.objective.ratio_at(None),
            "mask_strategy": c.mask_strategy,
            # none when no image could be read (the unreadable files are counted in skipped_files)
            "reconstruction_loss": loss_sum / count if count else None,
            "trivial_loss": trivial_sum / count if count else None,
            "trivial_predictor": "each masked patch predicted by its own mean pixel value",
        }
        if first is not None and self.main:
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c.method == "videomae" else (data.mean, data.std)
            with self._autocast(), self._backend():
                rec = self.objective.reconstruct(model, first.images.to(self.device), first.indices, EVAL_EPOCH,
                                                 mean, std)
            labels = rec.labels or [f"label {int(v)}" if v >= 0 else "" for v in first.labels[:8]]
            save_reconstructions(rec.original.cpu(), rec.masked.cpu(), rec.reconstruction.cpu(),
                                 os.path.join(self.out_dir, "reconstructions.png"),
                                 title=f"{c.model}, {self.heldout_name} images, {c.mask_strategy} masks, ratio "
                                       f"{self.objective.ratio_at(None):.3g}"
                                 + ("; predicted patches shown at the original patch's mean and std (normalised "
                                    "targets)" if c.norm_pix_loss and c.method != "simmim" else ""),
                                 column_labels=labels)
        # labels on both sides: at least two training classes (the probes' training set) and labelled held-out
        # images
        labelled = (self.heldout_set is not None and len(getattr(self.heldout_set, "classes", [])) >= 1
                    and len(getattr(self.train_eval_set, "classes", [])) >= 2)
        result["probes"] = None
        if not labelled:
            result["probes_skipped"] = ("no labelled training and held-out splits (class sub-folders in train/, at "
                                        "least two, and in val/)")
        else:
            torch.manual_seed(c.seed)
            init_model = build_model(c, _channels(c)).to(self.device).eval()
            probes = {}
            for name, m in (("trained", model), ("random_init", init_model)):
                tr_x, tr_y = self._features(m, self.train_eval_set, c.eval_max_images)
                te_x, te_y = self._features(m, self.heldout_set, c.eval_max_images)
                if len(tr_y) == 0 or len(te_y) == 0:
                    result["probes_skipped"] = "no readable image in the training or held-out split"
                    break
                if not (bool(torch.isfinite(tr_x).all()) and bool(torch.isfinite(te_x).all())):
                    result["probes_skipped"] = f"the {name.replace('_', ' ')} encoder's features are not finite"
                    break
                probes[name] = {"knn_top1": knn_accuracy(tr_x, tr_y, te_x, te_y),
                                "linear_probe_top1": linear_probe_accuracy(tr_x, tr_y, te_x, te_y)}
            if len(probes) == 2:
                result["probes"] = probes
                result["probe_train_images"], result["probe_test_images"] = len(tr_y), len(te_y)
        model.train()
        return result

    def finish(self, stopped_by: Optional[str]) -> Optional[dict[str, Any]]:
        records = read_metrics(self.metrics.path) if self.main and os.path.exists(self.metrics.path) else []
        if self.main and records:
            save_loss_curve(records, os.path.join(self.out_dir, "loss_curve.png"),
                            title=f"{self.config.model} on {self.config.data}")
        if stopped_by is not None or not self.config.eval:
            return None
        result = self.evaluate()
        if self.main:
            logged = [r["loss"] for r in records if r.get("loss") is not None]  # windows of no readable image log none
            result["final_train_loss"] = logged[-1] if logged else None
            with open(os.path.join(self.out_dir, "eval.json"), "w") as f:
                json.dump(result, f, indent=2)
            self._log(format_eval(result))
        return result


def format_eval(result: dict[str, Any]) -> str:
    def value(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [f"evaluation on {result['images']} {result['split']} images (mask ratio {result['mask_ratio']}):",
             f"  masked reconstruction loss  {value(result['reconstruction_loss'])}",
             f"  per-patch-mean predictor    {value(result['trivial_loss'])}"]
    probes = result.get("probes")
    if probes:
        lines.append(f"  {'encoder':<14}{'kNN top-1':>12}{'linear probe':>15}")
        for name, p in probes.items():
            lines.append(f"  {name:<14}{p['knn_top1']:>12.3f}{p['linear_probe_top1']:>15.3f}")
    else:
        lines.append(f"  probes skipped: {result.get('probes_skipped')}")
    return "\n".join(lines)


def _agree_on_output_dir(config: PretrainConfig, given: bool, info: DistInfo) -> tuple[PretrainConfig, bool]:
    """``--resume auto`` without ``--output-dir`` continues the newest run folder of the model, else a new default
    folder is claimed; every rank then uses rank 0's folder (a default name holds a timestamp the ranks need not
    agree on), or raises rank 0's error. Returns the config and whether this start created the folder."""
    out = config.output_dir
    found = None
    if not given and config.resume == "auto":
        found = ckpt.find_resume_checkpoint(None, config.model)
        if found is not None:
            out = os.path.dirname(found)
    claimed = not given and found is None
    error = None
    if claimed and info.rank == 0:
        try:
            out = _claim_new_folder(out)
        except SetupError as e:  # told to every rank below, so none waits for the others
            error = str(e)
    if info.distributed:
        import torch.distributed as dist

        shared = [out, error]
        dist.broadcast_object_list(shared, src=0)
        out, error = shared
    if error is not None:
        raise SetupError(error)
    return dataclasses.replace(config, output_dir=out), claimed


def _remove_if_empty(path: Optional[str]) -> None:
    try:
        if path:
            os.rmdir(path)
    except OSError:  # not empty, or not there
        pass


def _claim_new_folder(path: str) -> str:
    """Create the default run folder, or ``path-2``, ``path-3``, ... when it exists: runs started within the same
    second (a sweep) would share a timestamped name, and so one metrics file and checkpoint."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise SetupError(f"cannot create the folder of the runs, {parent} ({e.strerror or e})") from e
    for k in range(1, 1000):
        candidate = path if k == 1 else f"{path}-{k}"
        try:
            os.mkdir(candidate)  # atomic: exactly one process creates it
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise SetupError(f"cannot create the run folder {candidate} ({e.strerror or e})") from e
    raise SetupError(f"no free run folder name next to {path}; pass --output-dir")


class SetupError(ValueError):
    """The run cannot start: the flags, the model and the data do not fit together. Raised before the first step
    only; a ValueError during training is a bug and keeps its traceback."""


def _check_fresh_output_dir(config: PretrainConfig) -> None:
    """A run without ``--resume`` must not overwrite another run's checkpoint."""
    existing = os.path.join(config.output_dir, ckpt.CHECKPOINT_NAME)
    if config.resume is None and os.path.isfile(existing):
        raise SetupError(f"{config.output_dir} already holds a run's checkpoint; continue it with --resume auto, or "
                         "pick another --output-dir")


def train(config: PretrainConfig) -> RunResult:
    """Run a whole pretraining job (see the module docstring); ``config`` is resolved first."""
    try:
        info, device = init_distributed(config.device)
    except ValueError as e:  # a --device that does not exist here
        raise SetupError(str(e)) from e
    resolved, claimed = None, False
    try:
        resolved = resolve(config)
        resolved, claimed = _agree_on_output_dir(resolved, config.output_dir is not None, info)
        _check_fresh_output_dir(resolved)
        trainer = Trainer(resolved, info, device)
    except BaseException as e:
        shutdown(info)
        if claimed and info.rank == 0:
            _remove_if_empty(resolved.output_dir)
        if not isinstance(e, ValueError) or isinstance(e, (SetupError, DataError)):
            raise
        raise SetupError(str(e)) from e
    config = resolved
    try:
        try:
            trainer.resume()  # first: a refused resume leaves the run folder as it was
        except BaseException:
            if claimed and trainer.main:
                _remove_if_empty(trainer.out_dir)
            raise
        if trainer.main:
            os.makedirs(trainer.out_dir, exist_ok=True)
            with open(os.path.join(trainer.out_dir, "config.json"), "w") as f:
                json.dump(config.to_dict(), f, indent=2)
        trainer._log(
            f"{config.model} ({config.method}), {sum(p.numel() for p in trainer.model.parameters()):,} parameters, "
            f"{trainer.device} x {trainer.info.world_size}, {len(trainer.train_set)} training samples, "
            f"{trainer.steps_per_epoch} steps/epoch x {config.epochs} epochs, global batch "
            f"{trainer.samples_per_step}, lr {trainer.schedule.lr:.2e}, {trainer.flops_per_sample / 1e9:.3f} "
            f"GFLOP/sample; run folder {trainer.out_dir}")
        stopped_by = trainer.fit()
        result = trainer.finish(stopped_by)
        return RunResult(trainer.out_dir, trainer.step, stopped_by, result)
    finally:
        shutdown(trainer.info)
