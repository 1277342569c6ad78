"""Pure-JAX AR-SSM scan: chunked prefix sums with float32 accumulation and a hand-written backward.

Forward, for u, v, g of shape (B, L, R) and a = u ⊙ g, w = v ⊙ g:

    k_t = Σ_{s ≤ t} a_s        (reverse: Σ_{s ≥ t} a_s)
    ctx_t = k_t ⊙ w_t

The time axis is cut into chunks of `chunk_size`; each chunk gets a local inclusive cumsum and adds the exclusive
cumsum of the chunk totals as its carry. Rounding error then grows with chunk_size + L/chunk_size instead of L,
which keeps float32 sound at L = 65,536. Accumulation is float32 even for bf16 inputs; the output is cast back.

Backward (c = dctx; "cumsum" below is the scan in the opposite direction of the forward one):

    dk = c ⊙ w,   dw = c ⊙ k,   da = cumsum_opposite(dk)
    du = da ⊙ g,  dv = dw ⊙ g,  dg = da ⊙ u + dw ⊙ v

so d(u) = g ⊙ revcumsum(c ⊙ v ⊙ g) for the causal scan. The residuals are just (u, v, g); k is recomputed in the
backward pass (one more cheap scan) instead of being stored, which halves the activation memory of the op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 256
_ACC = jnp.float32


def _acc_dtype(dtype) -> jnp.dtype:
    # float64 inputs (x64 mode) keep float64; everything narrower accumulates in float32.
    return jnp.promote_types(dtype, _ACC)


def chunked_cumsum(a: jax.Array, *, reverse: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Inclusive cumsum over axis 1 of a (B, L, R) array, two-level (within chunks + chunk carries).

    The result has a's dtype; callers pass an already-upcast array.
    """
    batch, length, rank = a.shape
    if length <= chunk_size:
        return jax.lax.cumsum(a, axis=1, reverse=reverse)
    n_chunks = -(-length // chunk_size)
    pad = n_chunks * chunk_size - length
    # Zero padding at the end changes neither prefix sums (it comes after every real t) nor suffix sums.
    a = jnp.pad(a, ((0, 0), (0, pad), (0, 0)))
    a = a.reshape(batch, n_chunks, chunk_size, rank)
    local = jax.lax.cumsum(a, axis=2, reverse=reverse)
    totals = local[:, :, 0, :] if reverse else local[:, :, -1, :]
    # Exclusive scan of the chunk totals, built by shifting (not by subtracting, which would cancel).
    zero = jnp.zeros_like(totals[:, :1])
    if reverse:
        carry = jnp.concatenate([jax.lax.cumsum(totals[:, 1:], axis=1, reverse=True), zero], axis=1)
    else:
        carry = jnp.concatenate([zero, jax.lax.cumsum(totals[:, :-1], axis=1)], axis=1)
    out = local + carry[:, :, None, :]
    return out.reshape(batch, n_chunks * chunk_size, rank)[:, :length]


def _forward(u, v, g, reverse, chunk_size):
    acc = _acc_dtype(jnp.result_type(u, v, g))
    u32, v32, g32 = u.astype(acc), v.astype(acc), g.astype(acc)
    k = chunked_cumsum(u32 * g32, reverse=reverse, chunk_size=chunk_size)
    return k, u32, v32, g32


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan(u, v, g, reverse, chunk_size):
    k, _, v32, g32 = _forward(u, v, g, reverse, chunk_size)
    return (k * (v32 * g32)).astype(jnp.result_type(u, v, g))


def _scan_fwd(u, v, g, reverse, chunk_size):
    return _scan(u, v, g, reverse, chunk_size), (u, v, g)


def _scan_bwd(reverse, chunk_size, residuals, ct):
    u, v, g = residuals
    k, u32, v32, g32 = _forward(u, v, g, reverse, chunk_size)
    c = ct.astype(k.dtype)
    dk = c * (v32 * g32)
    dw = c * k
    # The adjoint of a prefix sum is a suffix sum (and vice versa).
    da = chunked_cumsum(dk, reverse=not reverse, chunk_size=chunk_size)
    du = da * g32
    dv = dw * g32
    dg = da * u32 + dw * v32
    return du.astype(u.dtype), dv.astype(v.dtype), dg.astype(g.dtype)


_scan.defvjp(_scan_fwd, _scan_bwd)


def ar_ssm_scan_xla(u: jax.Array, v: jax.Array, g: jax.Array, *, reverse: bool = False,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """cumsum_t(u ⊙ g) ⊙ (v ⊙ g) over axis 1 of (B, L, R) arrays; see the module docstring."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    return _scan(u, v, g, bool(reverse), int(chunk_size))
