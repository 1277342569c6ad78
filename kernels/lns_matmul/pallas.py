"""LNS matmul ("max_log" and "exact", definitions in `api.py`) as a Pallas (Triton) GPU kernel.

One program computes a (block_m, block_n) tile of the output and walks K in blocks of block_k, forming the
(block_m, block_k, block_n) term block log_a + log_b (and the sign products) in registers:

* max_log keeps the running best log-magnitude and its sign; a block replaces it only when strictly larger and the
  winner inside a block is the smallest k reaching the block maximum, so ties go to the smallest k (as `reference`).
* exact keeps an online log-sum-exp (running max, rescaled sum) for the positive and for the negative terms.

No tensor cores: every term is an add (max_log) or an add and an exp (exact), so expect it to be slower than a float32
matmul of the same size. Inference only, like the other implementations: no custom gradient is defined.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .. import _pallas_backend as backend
from .config import LnsMatmulConfig

F32 = jnp.float32


def _load_blocks(la_ref, sa_ref, lb_ref, sb_ref, rows, cols, kb, m, n, k, block_k):
    ks = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)
    k_ok = ks < k
    ks = jnp.where(k_ok, ks, k)
    a_mask = (rows < m)[:, None] & k_ok[None, :]
    b_mask = k_ok[:, None] & (cols < n)[None, :]
    a_index = (rows[:, None], ks[None, :])
    b_index = (ks[:, None], cols[None, :])
    la = backend.load(la_ref.at[a_index], mask=a_mask, other=-jnp.inf)
    sa = backend.load(sa_ref.at[a_index], mask=a_mask, other=0.0)
    lb = backend.load(lb_ref.at[b_index], mask=b_mask, other=-jnp.inf)
    sb = backend.load(sb_ref.at[b_index], mask=b_mask, other=0.0)
    terms = la[:, :, None] + lb[None, :, :]
    signs = sa[:, :, None] * sb[None, :, :]
    return terms, signs


def _coords(m, n, block_m, block_n):
    rows = backend.program_id(0) * block_m + jnp.arange(block_m, dtype=jnp.int32)
    cols = backend.program_id(1) * block_n + jnp.arange(block_n, dtype=jnp.int32)
    out_mask = (rows < m)[:, None] & (cols < n)[None, :]
    # Out-of-range rows/columns point past the end, so masked stores cannot alias real elements.
    return jnp.where(rows < m, rows, m), jnp.where(cols < n, cols, n), out_mask


def _max_log_kernel(la_ref, sa_ref, lb_ref, sb_ref, out_ref, *, m, n, k, block_m, block_n, block_k):
    rows, cols, out_mask = _coords(m, n, block_m, block_n)
    k_iota = jnp.arange(block_k, dtype=jnp.int32)[None, :, None]

    def body(kb, state):
        best, best_sign = state
        terms, signs = _load_blocks(la_ref, sa_ref, lb_ref, sb_ref, rows, cols, kb, m, n, k, block_k)
        block_best = jnp.max(terms, axis=1)
        first = jnp.min(jnp.where(terms == block_best[:, None, :], k_iota, block_k), axis=1)
        block_sign = jnp.sum(jnp.where(k_iota == first[:, None, :], signs, 0.0), axis=1)
        better = block_best > best
        return jnp.where(better, block_best, best), jnp.where(better, block_sign, best_sign)

    init = (jnp.full((block_m, block_n), -jnp.inf, F32), jnp.zeros((block_m, block_n), F32))
    best, best_sign = lax.fori_loop(0, -(-k // block_k), body, init)
    backend.store(out_ref.at[rows[:, None], cols[None, :]], best_sign * jnp.exp(best), mask=out_mask)


def _lse_update(run_max, run_sum, terms):
    new_max = jnp.maximum(run_max, jnp.max(terms, axis=1))
    shift = jnp.where(new_max > -jnp.inf, new_max, 0.0)
    run_sum = run_sum * jnp.exp(run_max - shift) + jnp.sum(jnp.exp(terms - shift[:, None, :]), axis=1)
    return new_max, run_sum


def _exact_kernel(la_ref, sa_ref, lb_ref, sb_ref, out_ref, *, m, n, k, block_m, block_n, block_k):
    rows, cols, out_mask = _coords(m, n, block_m, block_n)

    def body(kb, state):
        pos_max, pos_sum, neg_max, neg_sum = state
        terms, signs = _load_blocks(la_ref, sa_ref, lb_ref, sb_ref, rows, cols, kb, m, n, k, block_k)
        pos_max, pos_sum = _lse_update(pos_max, pos_sum, jnp.where(signs > 0, terms, -jnp.inf))
        neg_max, neg_sum = _lse_update(neg_max, neg_sum, jnp.where(signs < 0, terms, -jnp.inf))
        return pos_max, pos_sum, neg_max, neg_sum

    neg_inf = jnp.full((block_m, block_n), -jnp.inf, F32)
    zero = jnp.zeros((block_m, block_n), F32)
    pos_max, pos_sum, neg_max, neg_sum = lax.fori_loop(0, -(-k // block_k), body, (neg_inf, zero, neg_inf, zero))
    out = pos_sum * jnp.exp(pos_max) - neg_sum * jnp.exp(neg_max)
    backend.store(out_ref.at[rows[:, None], cols[None, :]], out, mask=out_mask)


_KERNELS = {"max_log": _max_log_kernel, "exact": _exact_kernel}


def lns_matmul_pallas(log_a, sign_a, log_b, sign_b, *, algorithm: str = "max_log",
                      config: LnsMatmulConfig | None = None, interpret: bool = False) -> jax.Array:
    """A @ B from LNS inputs (float32 (M, K), (M, K), (K, N), (K, N)) with the Pallas kernel; float32 (M, N)."""
    backend.require("lns_matmul", interpret)
    if algorithm not in _KERNELS:
        raise ValueError(f"algorithm must be one of {tuple(_KERNELS)}, got {algorithm!r}")
    config = LnsMatmulConfig() if config is None else config
    la, sa, lb, sb = (jnp.asarray(x, F32) for x in (log_a, sign_a, log_b, sign_b))
    m, k = la.shape
    n = lb.shape[1]
    kernel = functools.partial(_KERNELS[algorithm], m=m, n=n, k=k, block_m=config.block_m,
                               block_n=config.block_n, block_k=config.block_k)
    grid = (-(-m // config.block_m), -(-n // config.block_n))
    return backend.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((m, n), F32), grid=grid,
                               num_warps=config.num_warps, num_stages=config.num_stages, interpret=interpret,
                               name=f"lns_matmul_{algorithm}")(la, sa, lb, sb)
