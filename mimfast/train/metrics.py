"""Throughput, model FLOPs utilisation, peak memory, and the ``metrics.jsonl`` log of a run."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["MetricsLog", "read_metrics", "train_flops_per_sample", "peak_flops", "peak_memory_mb", "mfu"]

# Dense bf16 tensor-core peaks (vendor datasheets), matched in this order against the device name: the PCIe and
# NVL boards of a chip before its SXM part. Unknown devices get no MFU rather than a guess.
_PEAK_BF16 = (("H100 PCIe", 756e12), ("H800 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12),
              ("H200", 989.4e12), ("H100", 989.4e12), ("H800", 989.4e12), ("B200", 2250e12), ("A100", 312e12),
              ("A800", 312e12), ("L40S", 362e12))


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Peak FLOP/s of ``device`` for this precision, or None where it is not known (CPU, fp32, other GPUs)."""
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16:
        if key in name:
            return value
    return None


def train_flops_per_sample(model: nn.Module, run_forward: Callable[[], Any], batch: int) -> float:
    """FLOPs of one training step per sample: 3x the forward FLOPs counted by ``FlopCounterMode`` (the backward
    of a matmul costs twice its forward). The forward runs with the model in its pure-PyTorch reference mode,
    so every matmul is visible to the counter; the model's mode is restored afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    fused = getattr(model, "fused", None)
    if fused is not None:
        model.fused = False
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            run_forward()
    finally:
        if fused is not None:
            model.fused = fused
    return 3.0 * counter.get_total_flops() / batch


def mfu(samples_per_s: float, flops_per_sample: float, peak: Optional[float], world_size: int) -> Optional[float]:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices."""
    if peak is None or flops_per_sample <= 0:
        return None
    return samples_per_s * flops_per_sample / (peak * world_size)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory (CUDA) or peak resident memory of this process (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class MetricsLog:
    """Appends one JSON object per line to ``<run>/metrics.jsonl`` (only where ``enabled``, i.e. on rank 0)."""

    def __init__(self, path: str, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (left by a run killed after its last checkpoint), so a resumed run's log
        holds each step once."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics file; a line that does not parse (the last one of a process killed while
    writing it) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
