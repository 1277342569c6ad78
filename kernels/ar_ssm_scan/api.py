"""Entry point of the AR-SSM scan op, dispatching on `implementation` (`kernels/dispatch.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..dispatch import Dispatcher
from . import pallas
from .reference import ar_ssm_scan_reference
from .xla import DEFAULT_CHUNK_SIZE, ar_ssm_scan_xla

DISPATCHER = Dispatcher("ar_ssm_scan", ("xla", "reference", "pallas"))
# The values `implementation=` accepts, None (the default) first.
IMPLEMENTATIONS = DISPATCHER.choices
# Those that can run here (decided when called: at import time it would initialise the JAX backend).
available_implementations = DISPATCHER.available


def _check_inputs(u, v, g) -> None:
    shapes = {name: jnp.shape(a) for name, a in (("u", u), ("v", v), ("g", g))}
    if len(shapes["u"]) != 3 or len(set(shapes.values())) != 1:
        raise ValueError(f"ar_ssm_scan expects u, v, g of one shape (B, L, R); got {shapes}")
    for name, a in (("u", u), ("v", v), ("g", g)):
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise TypeError(f"ar_ssm_scan expects real floating inputs; {name} has dtype {jnp.result_type(a)}")


def ar_ssm_scan(u: jax.Array, v: jax.Array, g: jax.Array, *, reverse: bool = False,
                implementation: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """ctx = cumsum_t(u ⊙ g) ⊙ (v ⊙ g) for (B, L, R) inputs, inclusive, along axis 1.

    reverse=True uses the inclusive suffix sum Σ_{s ≥ t} instead (the anti-causal half of the bidirectional
    AR-SSM). The reference's CUDA "fused scan" is not a prefix sum (REFERENCE_SPEC §2.4); this op implements its
    documented intent, which is what the reference computes on CPU.

    implementation: None (the default: "pallas" on a CUDA GPU of compute capability >= 8.0, "xla" elsewhere;
    on a GPU where the kernel cannot run or does not take the inputs, e.g. float64, the default falls back to
    "xla" and warns once), "pallas" (fused Pallas/Triton kernels, see `pallas.py`; raises PallasUnavailableError
    where they cannot run), "xla" (chunked float32-accumulating scan, custom VJP) or "reference" (plain jnp,
    input-dtype accumulation). `chunk_size` applies to "xla" only.
    """
    DISPATCHER.check(implementation)
    _check_inputs(u, v, g)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    implementation = DISPATCHER.choose(implementation, supports=lambda: pallas.supports(u, v, g))
    if implementation == "pallas":
        return pallas.ar_ssm_scan_pallas(u, v, g, reverse=reverse)
    if implementation == "reference":
        return ar_ssm_scan_reference(u, v, g, reverse=reverse)
    return ar_ssm_scan_xla(u, v, g, reverse=reverse, chunk_size=chunk_size)
