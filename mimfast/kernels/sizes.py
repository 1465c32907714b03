"""Host-side integer helpers for launch configurations.

``triton.next_power_of_2`` and ``triton.cdiv`` are constexpr functions whose Python wrapper costs about 5 us a call
on the host, several times per op call; these are the same arithmetic on plain ints.
"""

from __future__ import annotations


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_SM_COUNT: dict = {}


def sm_count(device) -> int:
    """Multiprocessors of a CUDA device (read once per device); 4 elsewhere (the interpreter's grids)."""
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        import torch

        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for b > 0."""
    return -(-a // b)
