"""Measured defaults of the Pallas kernels' block sizes and per-mode choices: one table per op.

Each op's `config.py` (and the BK forward kernels, for their per-mode choices) reads its defaults from here; a
config passed explicitly overrides them. Measured on one NVIDIA H100 80GB HBM3 (jax 0.11.2, triton 3.6),
2026-11-26, with `benchmarks/kernels.py` (device timing). The comment beside each entry names the section of
docs/perf/NOTES.md that holds its history (predictions, sweeps, the variants that lost); entries marked "not swept"
are the first value tried, timed only as the default.
"""

from __future__ import annotations

# BK-Core (kernels/bk_scan): forward lane-scan kernels (`pallas_forward.py`), backward kernels (`pallas_backward.py`)
# and the torch-parity sweeps kernel (`pallas_torch_parity.py`). Rules of the shape-dependent entries are in
# `bk_scan/config.py`.
BK_SCAN = {
    # Backward and torch-parity kernels, chunked three-phase form: chunk = the power of two >= sqrt(N), clipped to
    # [vector, max_chunk]. Vector 16, chunks 64-512, 32-64 lanes on 1-2 warps were no better (v3, run 3 sweeps).
    "vector": 8,
    "lanes": 128,
    "max_chunk": 1024,
    "num_warps": 4,
    "carry_rows": 32,              # not swept
    "carry_vector": 8,             # not swept
    "carry_warps": 1,              # two warps: -0.3 µs, within noise (v8, change 8)
    "num_stages": 1,
    # Forward (lane-scan form): scan_vector positions per lane, short rows / from scan_vector_long_from on (v6,
    # run 6 sweep; v8, change 8: L = 32, V = 32 best at N = 65,536).
    "scan_vector": 16,
    "scan_vector_long": 32,
    "scan_vector_long_from": 32768,
    # scan_lanes: the power of two nearest scan_positions_per_sqrt_n * sqrt(N) / scan_vector, clipped to
    # [scan_lanes_min, scan_lanes_max] (v6, run 6 sweep).
    "scan_positions_per_sqrt_n": 4,
    "scan_lanes_min": 32,
    "scan_lanes_max": 1024,
    "scan_chunks_per_program": 1,  # 2, 4 and 8 were slower (v7, run 9b)
    # Output columns per store of the values kernel, per mode (v8, change 7; runs 12-13).
    "store_columns": {"left": 16, "right": 16, "both": 8},
    # Reciprocals as one SFU instruction (rcp.approx.ftz.f32) instead of a division, per mode (v10 (b), runs 17-18).
    "sfu_reciprocal": {"left": False, "right": False, "both": True},
}

# AR-SSM scan (kernels/ar_ssm_scan). block_r = the power of two >= R, at most block_r_max; block_t for full-width
# column blocks, block_t_narrow when R < block_r_max (v1 design; v3, run 3 sweeps: neighbours within 5 %).
AR_SSM_SCAN = {
    "block_t": 64,
    "block_t_narrow": 128,
    "block_r_max": 32,
    "num_warps": 4,
    "backward_warps": 8,           # 255 -> 171-180 registers per thread (v3, ncu run 4)
    "num_stages": 2,
    # Programs wanted in flight (about two per SM of an H100, 132 SMs), and the count below which segments are
    # added (v1 design, not swept).
    "target_programs": 264,
    "min_programs_without_segments": 128,
}

# LNS matmul (kernels/lns_matmul): not swept; run 4 timed this default ("LNS matmul and the training step").
LNS_MATMUL = {
    "block_m": 32,
    "block_n": 32,
    "block_k": 8,
    "num_warps": 4,
    "num_stages": 2,
}
