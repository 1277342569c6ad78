"""The obvious, slow, correct AR-SSM scan: ctx = cumsum_t(u ⊙ g) ⊙ (v ⊙ g).

Everything happens in the input dtype (a bf16 input is summed in bf16), so this is the yardstick for values and
gradients (plain autodiff), not for low-precision accuracy.
"""

from __future__ import annotations

import jax


def ar_ssm_scan_reference(u: jax.Array, v: jax.Array, g: jax.Array, *, reverse: bool = False) -> jax.Array:
    """Inclusive prefix sum (suffix sum if `reverse`) of u ⊙ g over axis 1, times v ⊙ g. Shapes (B, L, R)."""
    k = jax.lax.cumsum(u * g, axis=1, reverse=reverse)
    return k * (v * g)
