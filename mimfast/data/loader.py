"""Sampling and batching: which sample goes to which rank and step, and how items become batches.

The order of an epoch is one permutation of the data drawn from (seed, epoch). Rank r of W takes positions
r, r + W, r + 2W, ... of it, and step s of a rank with per-rank batch B takes that rank's positions
[s*B, (s+1)*B). The union over ranks of step s is then positions [s*B*W, (s+1)*B*W) of the permutation: the
same samples one process with batch B*W sees at step s. Together with per-sample augmentation and mask seeds
this makes a data-parallel run and a single-process run with the same global batch train on the same data,
and lets a resumed run start in the middle of an epoch without replaying it.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import torch

from mimfast.data.datasets import Unreadable

__all__ = ["Batch", "EpochBatchSampler", "collate", "own_process_group", "make_loader"]


class Batch(NamedTuple):
    """images [B, C, H, W] or [B, C, T, H, W]; labels [B] int64 (-1 without labels); indices [B] int64 data-set
    indices (the mask seed); skipped: paths of unreadable files dropped from this batch."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: tuple[str, ...] = ()


class EpochBatchSampler:
    """Yields, per step, the list of keys ``(epoch, index)`` of this rank's batch.

    ``shuffle=True``: a fresh permutation per epoch from (seed, epoch), the tail that does not fill a whole
    global batch dropped (every step has the same shape on every rank). ``shuffle=False``: ``indices`` in order,
    the last batch possibly short (evaluation). :meth:`set_epoch` picks the epoch and the step to start from.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, world_size: int = 1, rank: int = 0,
                 shuffle: bool = True, indices: Optional[Sequence[int]] = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.indices = list(range(num_samples)) if indices is None else list(indices)
        self.batch_size, self.seed = batch_size, seed
        self.world_size, self.rank, self.shuffle = world_size, rank, shuffle
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        per_rank = len(self.indices) // self.world_size
        if self.shuffle:
            return per_rank // self.batch_size
        return -(-len(self.indices[self.rank::self.world_size]) // self.batch_size)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return self.indices[self.rank::self.world_size]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.indices), generator=g).tolist()
        used = (len(perm) // self.world_size) * self.world_size
        return [self.indices[p] for p in perm[self.rank:used:self.world_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self._order()
        B = self.batch_size
        for s in range(self.start_step, len(self)):
            yield [(self.epoch, i) for i in order[s * B:(s + 1) * B]]


def collate(items: Sequence[Any]) -> Batch:
    """Stack readable items; unreadable ones are dropped and listed in ``Batch.skipped``."""
    good = [it for it in items if not isinstance(it, Unreadable)]
    skipped = tuple(it.path for it in items if isinstance(it, Unreadable))
    if not good:
        empty = torch.empty(0)
        return Batch(empty, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([it[0] for it in good])
    labels = torch.tensor([it[1] for it in good], dtype=torch.long)
    indices = torch.tensor([it[2] for it in good], dtype=torch.long)
    return Batch(images, labels, indices, skipped)


def own_process_group(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker leaves the training process's process group.

    torchrun, SLURM and Kubernetes signal a whole process group, and Ctrl-C signals the terminal's foreground
    group. A worker killed by such a signal makes the main process fail ("DataLoader worker ... is killed by
    signal") before its own handler can stop training at the next step and save a checkpoint. In a group of its
    own the worker only gets the signals sent to it by pid: the DataLoader's shutdown still ends it, and it exits
    by itself when the main process dies (the DataLoader's watchdog).
    """
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)


def make_loader(dataset: Any, sampler: EpochBatchSampler, num_workers: int = 0,
                pin_memory: bool = False) -> Any:
    """An iterable of :class:`Batch` for the sampler's current epoch.

    In-memory data sets (with ``collate_keys``) are batched in this process by one gather; others go through a
    ``torch.utils.data.DataLoader`` whose workers decode files (persistent across epochs), each in its own process
    group (:func:`own_process_group`).
    """
    if hasattr(dataset, "collate_keys"):
        return _InMemoryLoader(dataset, sampler)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, worker_init_fn=own_process_group if num_workers > 0 else None,
    )


class _InMemoryLoader:
    def __init__(self, dataset: Any, sampler: EpochBatchSampler) -> None:
        self.dataset, self.sampler = dataset, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        for keys in self.sampler:
            yield Batch(*self.dataset.collate_keys(keys))
