"""Obvious LNS matmuls: materialise every product term, shape (M, K, N). For tests and small inputs only.

Inputs: log_a (M, K), sign_a (M, K), log_b (K, N), sign_b (K, N), float32; the term (m, k, n) has log-magnitude
log_a[m, k] + log_b[k, n] and sign sign_a[m, k] * sign_b[k, n]. Output float32 (M, N).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def max_log_matmul(log_a: jax.Array, sign_a: jax.Array, log_b: jax.Array, sign_b: jax.Array) -> jax.Array:
    """The dominant term of each output with its own sign; ties go to the smallest k (jnp.argmax's rule)."""
    terms = log_a[:, :, None] + log_b[None, :, :]
    k_star = jnp.argmax(terms, axis=1)  # (M, N)
    best = jnp.take_along_axis(terms, k_star[:, None, :], axis=1)[:, 0, :]
    sign = jnp.take_along_axis(sign_a, k_star, axis=1) * jnp.take_along_axis(sign_b, k_star, axis=0)
    return sign * jnp.exp(best)


@jax.jit
def exact_matmul(log_a: jax.Array, sign_a: jax.Array, log_b: jax.Array, sign_b: jax.Array) -> jax.Array:
    """exp(logsumexp of the positive terms) - exp(logsumexp of the negative terms); zero-sign terms drop out."""
    terms = log_a[:, :, None] + log_b[None, :, :]
    signs = sign_a[:, :, None] * sign_b[None, :, :]
    log_pos = jax.nn.logsumexp(jnp.where(signs > 0, terms, -jnp.inf), axis=1)
    log_neg = jax.nn.logsumexp(jnp.where(signs < 0, terms, -jnp.inf), axis=1)
    return jnp.exp(log_pos) - jnp.exp(log_neg)
