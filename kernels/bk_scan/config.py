"""Block sizes of the BK-Core Pallas scan (chunked three-phase form, see `pallas.py`).

chunk      time steps per chunk (a power of two, a multiple of `vector`). Each chunk is one lane of phases 1 and
           3 (sequential over `chunk` steps); phase 2 is sequential over N / chunk chunks per row. The sequential
           depth chunk + N/chunk + chunk is smallest near sqrt(N); None picks that.
vector     steps loaded, computed (unrolled) and stored together per lane: 8 float32 = one 32-byte sector per
           lane for the loads of a, 64 bytes per lane for the stores of (Re G, Im G). The projective state is
           renormalised (exact power of two) once per vector, so intermediates grow at most (|d| + |k|)^vector
           between renormalisations: vector=8 is safe for |a - z| + |k| up to 1e4.
lanes      (row, chunk) lanes per program of phases 1 and 3 (a power of two).
carry_rows rows per program of phase 2 (a power of two), carry_vector chunks handled per load there.
"""

from __future__ import annotations

import dataclasses
import math

from .._checks import is_power_of_two


@dataclasses.dataclass(frozen=True)
class BkScanConfig:
    chunk: int | None = None
    vector: int = 8
    lanes: int = 128
    carry_rows: int = 32
    carry_vector: int = 8
    num_warps: int = 4
    carry_warps: int = 1
    num_stages: int = 1

    def __post_init__(self):
        if self.chunk is not None and (not is_power_of_two(self.chunk) or self.chunk < self.vector):
            raise ValueError(f"BkScanConfig.chunk must be None or a power of two >= vector, got {self.chunk!r}")
        for name in ("vector", "lanes", "carry_rows", "carry_vector"):
            if not is_power_of_two(getattr(self, name)):
                raise ValueError(f"BkScanConfig.{name} must be a power of two, got {getattr(self, name)!r}")
        for name in ("num_warps", "carry_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(f"BkScanConfig.{name} must be 1, 2, 4, 8 or 16, got {getattr(self, name)!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"BkScanConfig.num_stages must be an int >= 1, got {self.num_stages!r}")

    def chunk_for(self, n: int) -> int:
        if self.chunk is not None:
            return self.chunk
        return max(self.vector, min(1024, 1 << max(0, math.ceil(math.log2(max(1.0, math.sqrt(n)))))))


def describe(config: BkScanConfig, batch: int, n: int) -> str:
    chunk = config.chunk_for(n)
    chunks = -(-n // chunk)
    return (f"chunk={chunk} chunks={chunks} vector={config.vector} lanes={config.lanes} "
            f"programs={-(-batch * chunks // config.lanes)} carry_rows={config.carry_rows} warps={config.num_warps}")
