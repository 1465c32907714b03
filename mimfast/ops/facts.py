"""Facts an op knows about a tensor it produced, kept for as long as that tensor stays unchanged.

A masking op knows its indices are in range and how many patches its mask removes. A later op handed the very same
tensor (the same object, no in-place change since: its version counter has not moved) can then skip a check or a
reduction on the device. Anything else (a copy, a view, an edited tensor, a tensor under torch.compile) gets no
fact, and the op does the work.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch


class TensorFacts:
    """id -> (weak reference, version counter, fact), holding at most about ``kept`` tensors."""

    def __init__(self, kept: int = 64) -> None:
        self.kept = kept
        self._entries: dict[int, tuple[weakref.ref, int, Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def mark(self, t: torch.Tensor, fact: Any) -> None:
        """Record ``fact`` about ``t`` as it is now."""
        if torch.compiler.is_compiling() or t.is_inference():  # inference tensors have no version counter
            return
        self._entries[id(t)] = (weakref.ref(t), t._version, fact)
        if len(self._entries) > self.kept:
            dead = [k for k, (ref, _, _) in self._entries.items() if ref() is None]
            for key in dead or list(self._entries)[: len(self._entries) // 2]:
                del self._entries[key]

    def get(self, t: torch.Tensor) -> Optional[Any]:
        """The fact recorded about ``t``, or None when there is none or ``t`` has changed since."""
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t or t.is_inference() or entry[1] != t._version:
            return None
        return entry[2]


# masks whose weights are known to sum to an integer total (every weight 0 or 1): the loss then needs no pass to
# sum them
_MASK_TOTALS = TensorFacts()


def mark_mask_total(mask: torch.Tensor, total: int) -> None:
    """Record that ``mask`` (as it is now) holds only 0 and 1, ``total`` of them 1."""
    _MASK_TOTALS.mark(mask, int(total))


def known_mask_total(mask: torch.Tensor) -> Optional[int]:
    """The number of ones of a mask registered by :func:`mark_mask_total` and unchanged since, else None."""
    if torch.compiler.is_compiling():
        return None
    return _MASK_TOTALS.get(mask)
