"""Pure-JAX LNS matmuls, blocked over K so that the (M, block_k, N) term tensor bounds the memory.

A `lax.scan` walks the K blocks carrying running reductions:
* max_log: the best log-magnitude so far and its sign. A later block replaces it only when strictly larger,
  and `argmax` inside a block picks the first maximum, so ties resolve to the smallest k as in `reference`.
* exact: an online log-sum-exp (running max and rescaled sum) for the positive and for the negative terms.
K is padded to a multiple of block_k with log = -inf and sign = 0, terms that neither win nor contribute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Elements of one (M, block_k, N) term block when block_k is chosen automatically (16 MiB in float32).
_AUTO_BLOCK_ELEMENTS = 1 << 22


def choose_block_k(m: int, k: int, n: int) -> int:
    """Largest block_k <= K whose term block stays under the automatic budget (at least 1)."""
    return max(1, min(k, _AUTO_BLOCK_ELEMENTS // max(1, m * n)))


def _blocks(log_a, sign_a, log_b, sign_b, block_k):
    m, k = log_a.shape
    n = log_b.shape[1]
    nblocks = -(-k // block_k)
    pad = nblocks * block_k - k
    if pad:
        log_a = jnp.pad(log_a, ((0, 0), (0, pad)), constant_values=-jnp.inf)
        sign_a = jnp.pad(sign_a, ((0, 0), (0, pad)))
        log_b = jnp.pad(log_b, ((0, pad), (0, 0)), constant_values=-jnp.inf)
        sign_b = jnp.pad(sign_b, ((0, pad), (0, 0)))
    # A blocks: (nblocks, M, block_k); B blocks: (nblocks, block_k, N)
    a_blocks = lambda x: x.reshape(m, nblocks, block_k).transpose(1, 0, 2)
    b_blocks = lambda x: x.reshape(nblocks, block_k, n)
    return (a_blocks(log_a), a_blocks(sign_a), b_blocks(log_b), b_blocks(sign_b)), (m, n)


@functools.partial(jax.jit, static_argnames=("block_k",))
def max_log_matmul(log_a, sign_a, log_b, sign_b, *, block_k: int | None = None) -> jax.Array:
    bk = min(block_k, log_a.shape[1]) if block_k else choose_block_k(log_a.shape[0], log_a.shape[1], log_b.shape[1])
    xs, (m, n) = _blocks(log_a, sign_a, log_b, sign_b, bk)

    def step(carry, blk):
        best, best_sign = carry
        la, sa, lb, sb = blk
        terms = la[:, :, None] + lb[None, :, :]
        k_star = jnp.argmax(terms, axis=1)
        blk_best = jnp.max(terms, axis=1)
        blk_sign = jnp.take_along_axis(sa, k_star, axis=1) * jnp.take_along_axis(sb, k_star, axis=0)
        better = blk_best > best  # strict: an earlier block keeps a tie
        return (jnp.where(better, blk_best, best), jnp.where(better, blk_sign, best_sign)), None

    init = (jnp.full((m, n), -jnp.inf, jnp.float32), jnp.zeros((m, n), jnp.float32))
    (best, best_sign), _ = jax.lax.scan(step, init, xs)
    return best_sign * jnp.exp(best)


def _online_lse_update(run_max, run_sum, terms):
    """Fold a (M, bk, N) block of log-terms (-inf = absent) into a running (max, sum exp(. - max))."""
    new_max = jnp.maximum(run_max, jnp.max(terms, axis=1))
    # Shift by 0 while nothing finite has been seen, so that -inf - -inf never produces NaN.
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    run_sum = run_sum * jnp.exp(run_max - shift) + jnp.sum(jnp.exp(terms - shift[:, None, :]), axis=1)
    return new_max, run_sum


@functools.partial(jax.jit, static_argnames=("block_k",))
def exact_matmul(log_a, sign_a, log_b, sign_b, *, block_k: int | None = None) -> jax.Array:
    bk = min(block_k, log_a.shape[1]) if block_k else choose_block_k(log_a.shape[0], log_a.shape[1], log_b.shape[1])
    xs, (m, n) = _blocks(log_a, sign_a, log_b, sign_b, bk)

    def step(carry, blk):
        pos_max, pos_sum, neg_max, neg_sum = carry
        la, sa, lb, sb = blk
        terms = la[:, :, None] + lb[None, :, :]
        signs = sa[:, :, None] * sb[None, :, :]
        pos_max, pos_sum = _online_lse_update(pos_max, pos_sum, jnp.where(signs > 0, terms, -jnp.inf))
        neg_max, neg_sum = _online_lse_update(neg_max, neg_sum, jnp.where(signs < 0, terms, -jnp.inf))
        return (pos_max, pos_sum, neg_max, neg_sum), None

    neg_inf = jnp.full((m, n), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((m, n), jnp.float32)
    (pos_max, pos_sum, neg_max, neg_sum), _ = jax.lax.scan(step, (neg_inf, zeros, neg_inf, zeros), xs)
    return pos_sum * jnp.exp(pos_max) - neg_sum * jnp.exp(neg_max)
