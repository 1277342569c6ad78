"""Numerical kernels of phase1-jax, one package per op (installed as `phase1_jax.kernels`).

Each op package (`bk_scan`, `ar_ssm_scan`, `lns_matmul`) holds `reference` (the obvious, slow, correct version:
the tests' oracle), `xla` (the best pure-JAX version), `pallas` (the GPU kernels, split one file per pass where
large), `config` (block sizes) and `api` (the entry point taking `implementation=`). Shared: `dispatch` (the one
dispatcher: names, availability, the default and its fallback), `tuned_block_sizes` (the measured defaults) and
`_pallas_backend` (how the kernels are lowered and when they can run).
"""
