"""Block sizes of the BK-Core Pallas kernels (`pallas_forward.py`, `pallas_backward.py`, `pallas_torch_parity.py`).

Defaults come from the measured table `kernels/tuned_block_sizes.py` (BK_SCAN); the numbers below are its values.

Forward (lane-scan form, three launches):
scan_lanes   lanes per program of the forward kernels; a program is one chunk of scan_lanes * scan_vector positions
             of one row, each lane owns `scan_vector` consecutive positions, and the lanes' 2x2 maps are combined
             by an in-register scan (Triton `tt.scan`). None picks chunks of ~4 sqrt(N) positions: the power of
             two nearest 4 sqrt(N) / scan_vector within [32, 1024] (the best of the H100 sweeps at N = 8192 and
             65,536, docs/perf/NOTES.md).
scan_vector  consecutive positions per lane in the forward kernels (a power of two): more amortises the lane scan
             (one 2x2 matrix combine tree per program) over more positions, at the cost of registers. States and
             products are renormalised every 8 steps whatever the width. None: 32 from N = 32,768 on, else 16.
scan_warps   warps per program of the forward kernels; None: one lane per thread (scan_lanes / 32, 1 to 8).
scan_chunks_per_program
             chunks one program of the forward kernels walks in turn, loading the next chunk while it computes
             the current one, to overlap loads and arithmetic inside a program. On the H100 this did not pay
             (programs of one chunk already overlap each other's phases; B=64 N=65,536: 31.2 / 37.2 µs causal /
             bidirectional at 1 chunk, 31.8 / 38.4 at 4, worse at 2 and 8; docs/perf/NOTES.md v7), so the
             default is 1. Kept for cards with fewer SMs, where the programs run in many waves.
When N is a multiple of scan_lanes * scan_vector and every program's chunks exist, the forward kernels run without
masks (and, for unit coupling, with k = 1 on every step): ~1 µs faster for the causal scan at B=64 N=65,536.

Backward (chunked three-phase form; `chunk`, `lanes`, `carry_*` also size the torch-parity kernel):

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
from ..tuned_block_sizes import BK_SCAN as TUNED


@dataclasses.dataclass(frozen=True)
class BkScanConfig:
    chunk: int | None = None
    vector: int = TUNED["vector"]
    lanes: int = TUNED["lanes"]
    carry_rows: int = TUNED["carry_rows"]
    carry_vector: int = TUNED["carry_vector"]
    num_warps: int = TUNED["num_warps"]
    carry_warps: int = TUNED["carry_warps"]
    num_stages: int = TUNED["num_stages"]
    scan_lanes: int | None = None
    scan_vector: int | None = None
    scan_warps: int | None = None
    scan_chunks_per_program: int = TUNED["scan_chunks_per_program"]

    def __post_init__(self):
        if self.chunk is not None and (not is_power_of_two(self.chunk) or self.chunk < self.vector):
            raise ValueError(f"BkScanConfig.chunk must be None or a power of two >= vector, got {self.chunk!r}")
        for name in ("vector", "lanes", "carry_rows", "carry_vector", "scan_chunks_per_program"):
            if not is_power_of_two(getattr(self, name)):
                raise ValueError(f"BkScanConfig.{name} must be a power of two, got {getattr(self, name)!r}")
        for name, smallest in (("scan_lanes", 2), ("scan_vector", 1)):
            value = getattr(self, name)
            if value is not None and (not is_power_of_two(value) or value < smallest):
                raise ValueError(f"BkScanConfig.{name} must be None or a power of two >= {smallest}, got {value!r}")
        for name in ("num_warps", "carry_warps", "scan_warps"):
            value = getattr(self, name)
            if not (value is None and name == "scan_warps") and value not in (1, 2, 4, 8, 16):
                raise ValueError(f"BkScanConfig.{name} must be 1, 2, 4, 8 or 16"
                                 f"{' (or None)' if name == 'scan_warps' else ''}, got {value!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"BkScanConfig.num_stages must be an int >= 1, got {self.num_stages!r}")

    def chunk_for(self, n: int) -> int:
        if self.chunk is not None:
            return self.chunk
        return max(self.vector, min(TUNED["max_chunk"], 1 << max(0, math.ceil(math.log2(max(1.0, math.sqrt(n)))))))

    def scan_lanes_for(self, n: int) -> int:
        if self.scan_lanes is not None:
            return self.scan_lanes
        positions = TUNED["scan_positions_per_sqrt_n"] * math.sqrt(n)
        nearest = 1 << round(math.log2(max(1.0, positions / self.scan_vector_for(n))))
        return min(TUNED["scan_lanes_max"], max(TUNED["scan_lanes_min"], nearest))

    def scan_vector_for(self, n: int) -> int:
        if self.scan_vector is not None:
            return self.scan_vector
        return TUNED["scan_vector_long"] if n >= TUNED["scan_vector_long_from"] else TUNED["scan_vector"]

    def scan_warps_for(self, n: int) -> int:
        if self.scan_warps is not None:
            return self.scan_warps
        return min(8, max(1, self.scan_lanes_for(n) // 32))


def describe(config: BkScanConfig, batch: int, n: int) -> str:
    lanes = config.scan_lanes_for(n)
    vector = config.scan_vector_for(n)
    chunks = -(-n // (lanes * vector))
    per_program = min(chunks, config.scan_chunks_per_program)
    return (f"forward: lanes={lanes} vector={vector} chunks/row={chunks} chunks/program={per_program} "
            f"programs={batch * -(-chunks // per_program)} "
            f"warps={config.scan_warps_for(n)}; backward: chunk={config.chunk_for(n)} lanes={config.lanes}")
