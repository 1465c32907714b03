"""Process-group set-up and model wrapping for data-parallel runs (``torchrun ... -m mimfast.pretrain``).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is a single process. NCCL on GPUs, gloo
on CPU. DDP by default; with ``fsdp=True`` every transformer block and then the root are sharded with FSDP2
(``torch.distributed.fsdp.fully_shard``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "resolve_device", "wrap_model", "all_reduce_mean", "all_reduce_sum",
           "barrier", "shutdown", "transformer_blocks"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: Optional[str], local_rank: int = 0) -> torch.device:
    """``--device``, else the local rank's GPU when CUDA is present, else the CPU. A device that does not exist
    here raises a ValueError."""
    if requested is not None:
        try:
            device = torch.device(requested)
        except RuntimeError as e:
            raise ValueError(f"--device {requested!r} is not a device ({str(e).splitlines()[0]})") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {requested} requested but CUDA is not available")
            if device.index is None:
                device = torch.device("cuda", local_rank)
            if device.index >= torch.cuda.device_count():
                raise ValueError(f"--device {device} requested but this machine has {torch.cuda.device_count()} "
                                 "GPU(s)")
        elif device.type != "cpu":
            raise ValueError(f"--device {requested}: training runs on cpu or cuda devices")
        return device
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(requested_device: Optional[str]) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; returns (ranks, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistInfo(rank, world, local_rank), device


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every child of an ``nn.ModuleList`` whose name ends in ``blocks`` (encoder and decoder blocks)."""
    out: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1].endswith("blocks"):
            out.extend(module)
    return out


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, fsdp: bool) -> nn.Module:
    """The module to call in the training step: the model itself (single process), DDP, or the model sharded in
    place by FSDP2 (then the returned module is the model itself)."""
    if not info.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return all_reduce_sum(t, info) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
