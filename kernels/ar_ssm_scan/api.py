"""Dispatcher for the AR-SSM scan op."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _pallas_backend
from .reference import ar_ssm_scan_reference
from .xla import DEFAULT_CHUNK_SIZE, ar_ssm_scan_xla

IMPLEMENTATIONS = ("xla", "reference", "pallas")
# Available everywhere; "pallas" also where `available_implementations()` lists it (a CUDA GPU of compute
# capability >= 8.0); asking for it elsewhere raises PallasUnavailableError. (Not decided at import time, which
# would initialise the JAX backend as a side effect of importing.)
AVAILABLE_IMPLEMENTATIONS = ("xla", "reference")


def available_implementations() -> tuple[str, ...]:
    return AVAILABLE_IMPLEMENTATIONS + (("pallas",) if _pallas_backend.available() else ())


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
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"ar_ssm_scan: argument 'implementation' = {implementation!r} is not allowed; "
                         f"allowed values are None, " + ", ".join(repr(i) for i in IMPLEMENTATIONS))
    if implementation == "pallas":
        _pallas_backend.require("ar_ssm_scan", False, alternatives="'xla' or 'reference'")
    _check_inputs(u, v, g)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if implementation is None:
        from . import pallas
        if _pallas_backend.default_is_pallas("ar_ssm_scan", pallas.supports(u, v, g)):
            implementation = "pallas"
    if implementation == "pallas":
        from .pallas import ar_ssm_scan_pallas
        return ar_ssm_scan_pallas(u, v, g, reverse=reverse)
    if implementation == "reference":
        return ar_ssm_scan_reference(u, v, g, reverse=reverse)
    return ar_ssm_scan_xla(u, v, g, reverse=reverse, chunk_size=chunk_size)
