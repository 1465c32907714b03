"""Host-side integer helpers for launch configurations.

``triton.next_power_of_2`` and ``triton.cdiv`` are constexpr functions whose Python wrapper costs about 5 us a call
on the host, several times per op call; these are the same arithmetic on plain ints.
"""

from __future__ import annotations


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for b > 0."""
    return -(-a // b)
