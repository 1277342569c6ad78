"""Block sizes of the AR-SSM Pallas scan.

A program of the kernel owns one batch row, one block of `block_r` rank columns and one segment of the time axis,
and walks its segment in tiles of `block_t` time steps: local inclusive cumsum of the tile (float32), plus a
Kahan-compensated running carry between tiles. Segments exist only to give the GPU enough programs when
B * ceil(R / block_r) is small: with S > 1 segments a first light pass sums each segment (float32, compensated) and
the carries between segments are an exclusive scan of S numbers. Rounding therefore grows with block_t (the local
sum), not with L: float32 stays sound at L = 65,536 and beyond.

Defaults come from the measured table `kernels/tuned_block_sizes.py` (AR_SSM_SCAN).
"""

from __future__ import annotations

import dataclasses

from .._checks import is_power_of_two
from ..tuned_block_sizes import AR_SSM_SCAN as TUNED

# Programs wanted in flight: about two per streaming multiprocessor of an H100 (132 SMs); smaller cards just run
# more waves. Segments cost a first pass over u and g (half the forward's reads again), so they are used only when
# B * ceil(R / block_r) is below about one program per SM.
TARGET_PROGRAMS = TUNED["target_programs"]
MIN_PROGRAMS_WITHOUT_SEGMENTS = TUNED["min_programs_without_segments"]


@dataclasses.dataclass(frozen=True)
class ArSsmScanConfig:
    block_t: int = TUNED["block_t"]
    block_r: int = TUNED["block_r_max"]
    # None: chosen from the shape (enough programs for the GPU); an int: that many segments (clipped to L/block_t).
    num_segments: int | None = None
    num_warps: int = TUNED["num_warps"]
    # The backward kernel holds four prefetched input tiles and three output tiles: more warps spread them over
    # more registers (ncu, 2026-11-26: 255 registers per thread at 4 warps).
    backward_warps: int = TUNED["backward_warps"]
    num_stages: int = TUNED["num_stages"]

    def __post_init__(self):
        for name in ("block_t", "block_r"):
            value = getattr(self, name)
            if not is_power_of_two(value):
                raise ValueError(f"ArSsmScanConfig.{name} must be a power of two >= 1, got {value!r}")
        if self.num_segments is not None and (not isinstance(self.num_segments, int) or self.num_segments < 1):
            raise ValueError(f"ArSsmScanConfig.num_segments must be None or an int >= 1, got {self.num_segments!r}")
        for name in ("num_warps", "backward_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(f"ArSsmScanConfig.{name} must be 1, 2, 4, 8 or 16, got {getattr(self, name)!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"ArSsmScanConfig.num_stages must be an int >= 1, got {self.num_stages!r}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The launch geometry for one (B, L, R) shape: segments of seg_len steps (a multiple of block_t)."""
    num_segments: int
    seg_len: int
    num_col_blocks: int


def default_config(batch: int, length: int, rank: int) -> ArSsmScanConfig:
    """Block sizes for a shape; the segment count is left to `layout` (None)."""
    block_r = min(TUNED["block_r_max"], 1 << max(0, (rank - 1).bit_length()))
    block_t = TUNED["block_t"] if block_r >= TUNED["block_r_max"] else TUNED["block_t_narrow"]
    return ArSsmScanConfig(block_t=block_t, block_r=block_r)


def layout(config: ArSsmScanConfig, batch: int, length: int, rank: int) -> Layout:
    col_blocks = -(-rank // config.block_r)
    tiles = -(-length // config.block_t)
    if config.num_segments is None:
        base = max(1, batch * col_blocks)
        wanted = 1 if base >= MIN_PROGRAMS_WITHOUT_SEGMENTS else -(-TARGET_PROGRAMS // base)
    else:
        wanted = config.num_segments
    segments = max(1, min(wanted, tiles))
    seg_len = -(-tiles // segments) * config.block_t
    segments = -(-length // seg_len)
    return Layout(num_segments=max(1, segments), seg_len=seg_len, num_col_blocks=col_blocks)


def describe(config: ArSsmScanConfig, batch: int, length: int, rank: int) -> str:
    lay = layout(config, batch, length, rank)
    return (f"block_t={config.block_t} block_r={config.block_r} segments={lay.num_segments} "
            f"seg_len={lay.seg_len} programs={batch * lay.num_segments * lay.num_col_blocks} "
            f"warps={config.num_warps}/{config.backward_warps} stages={config.num_stages}")


__all__ = ["ArSsmScanConfig", "Layout", "MIN_PROGRAMS_WITHOUT_SEGMENTS", "TARGET_PROGRAMS", "default_config", "describe", "layout"]
