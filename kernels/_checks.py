"""Validation helpers shared by the kernels' block-size configs."""

from __future__ import annotations


def is_power_of_two(n: object) -> bool:
    """True for ints 1, 2, 4, ... (bools excluded): Triton block shapes must be powers of two."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and (n & (n - 1)) == 0
