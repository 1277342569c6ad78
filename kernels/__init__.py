"""Numerical kernels of phase1-jax, one package per op (installed as `phase1_jax.kernels`).

Each op package holds `reference` (obvious and slow), `xla` (the best pure-JAX version), `pallas` (GPU) where it
exists, and an `api` dispatcher taking `implementation=`.
"""
