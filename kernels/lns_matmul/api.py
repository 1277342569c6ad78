"""Entry point of the LNS matmul, dispatching on `implementation` (`kernels/dispatch.py`).

Definitions, for A (M, K) and B (K, N) given as log-magnitudes (log|x|; an exact zero is log 0 = -inf) and signs
in {-1, 0, +1} (a zero value should have sign 0 *and* log -inf), with terms
t[m, k, n] = log_a[m, k] + log_b[k, n] and s[m, k, n] = sign_a[m, k] * sign_b[k, n]:

* "max_log": out[m, n] = s[m, k*, n] * exp(t[m, k*, n]) with k* = argmax_k t[m, k, n] (ties: smallest k).
  Each output is its single dominant product term, the classic max-log approximation of log sum exp.
  It is multiplication-free but only an approximation: cancellation and all non-dominant terms are ignored.
* "exact": out[m, n] = exp(logsumexp_{k: s>0} t) - exp(logsumexp_{k: s<0} t), separate positive and negative
  accumulators; equal to A @ B up to float32 rounding.

The output is float32 of shape (M, N). LNS is **inference-only**: there is no custom gradient (the reference's
straight-through backward is not reproduced), and autodiff through max_log or through the -inf masking is not
meaningful for training. Train with an ordinary matmul (see `phase1_jax.models.lns.LNSLinear`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..dispatch import Dispatcher
from . import pallas, reference, xla

ALGORITHMS = ("max_log", "exact")
DISPATCHER = Dispatcher("lns_matmul", ("xla", "reference", "pallas"))
# The values `implementation=` accepts, None (the default) first.
IMPLEMENTATIONS = DISPATCHER.choices
# Those that can run here (decided when called: at import time it would initialise the JAX backend).
available_implementations = DISPATCHER.available

_TABLE = {
    ("reference", "max_log"): lambda la, sa, lb, sb, bk: reference.max_log_matmul(la, sa, lb, sb),
    ("reference", "exact"): lambda la, sa, lb, sb, bk: reference.exact_matmul(la, sa, lb, sb),
    ("xla", "max_log"): lambda la, sa, lb, sb, bk: xla.max_log_matmul(la, sa, lb, sb, block_k=bk),
    ("xla", "exact"): lambda la, sa, lb, sb, bk: xla.exact_matmul(la, sa, lb, sb, block_k=bk),
}


@jax.jit
def to_lns(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log|x|, sign x) in float32; zeros become (-inf, 0)."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.log(jnp.abs(x)), jnp.sign(x)


def lns_matmul(log_a: jax.Array, sign_a: jax.Array, log_b: jax.Array, sign_b: jax.Array, *,
               algorithm: str = "max_log", implementation: str | None = None,
               block_k: int | None = None) -> jax.Array:
    """A @ B computed from LNS inputs (see the module docstring for the exact definitions).

    implementation: None (the default: "pallas" on a CUDA GPU of compute capability >= 8.0, "xla" elsewhere),
    "pallas" (Pallas/Triton kernel, the term blocks stay in registers; raises PallasUnavailableError where it
    cannot run; `block_k` is ignored, see `config.LnsMatmulConfig`), "xla" (blocked over K; `block_k` None picks
    a block that keeps each (M, block_k, N) term tensor at 4M elements) or "reference" (materialises all M*K*N
    terms).
    """
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    DISPATCHER.check(implementation)
    if block_k is not None and (isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 1):
        raise ValueError(f"block_k must be None or an int >= 1, got {block_k!r}")

    arrays = [jnp.asarray(v, jnp.float32) for v in (log_a, sign_a, log_b, sign_b)]
    la, sa, lb, sb = arrays
    if la.ndim != 2 or lb.ndim != 2:
        raise ValueError(f"log_a and log_b must be 2-D, got shapes {la.shape} and {lb.shape}")
    if sa.shape != la.shape or sb.shape != lb.shape:
        raise ValueError(f"sign arrays must match their log arrays: sign_a {sa.shape} vs log_a {la.shape}, "
                         f"sign_b {sb.shape} vs log_b {lb.shape}")
    if la.shape[1] != lb.shape[0]:
        raise ValueError(f"inner dimensions differ: log_a is {la.shape}, log_b is {lb.shape}")
    if la.shape[1] == 0:
        return jnp.zeros((la.shape[0], lb.shape[1]), jnp.float32)
    implementation = DISPATCHER.choose(implementation)
    if implementation == "pallas":
        return pallas.lns_matmul_pallas(la, sa, lb, sb, algorithm=algorithm)
    return _TABLE[(implementation, algorithm)](la, sa, lb, sb, block_k)
