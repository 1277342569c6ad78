"""Block sizes of the LNS matmul Pallas kernel (`pallas.py`).

A program computes a (block_m, block_n) output tile and walks K in blocks of block_k, holding the
(block_m, block_k, block_n) term block in registers. Defaults come from the table `kernels/tuned_block_sizes.py`
(LNS_MATMUL).
"""

from __future__ import annotations

import dataclasses

from .._checks import is_power_of_two
from ..tuned_block_sizes import LNS_MATMUL as TUNED


@dataclasses.dataclass(frozen=True)
class LnsMatmulConfig:
    block_m: int = TUNED["block_m"]
    block_n: int = TUNED["block_n"]
    block_k: int = TUNED["block_k"]
    num_warps: int = TUNED["num_warps"]
    num_stages: int = TUNED["num_stages"]

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not is_power_of_two(value):
                raise ValueError(f"LnsMatmulConfig.{name} must be a power of two, got {value!r}")
