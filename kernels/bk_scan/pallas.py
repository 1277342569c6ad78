"""BK-Core native resolvent scans as Pallas (Triton) GPU kernels: the entry points and their custom VJPs.

Notation as in `xla.py`: d_t = a_t - z, k_t = b_{t-1} c_{t-1} (k_0 = 0). The causal resolvent
g_t = 1/(d_t - k_t g_{t-1}) is the ratio g_t = q_t / n_t of the projective state (p, q) = (theta_{t-1}, theta_t),
which steps linearly:

    (p, q) -> (q, n),   n = d_t q - k_t p.

Complex numbers are separate real and imaginary float32 planes (`complex_planes.py`). Projective states and matrix
products are renormalised by an exact power of two (every 8 steps, or once after a lane scan of at most 64 maps),
so they never overflow and rounding is only that of the products; divisions of projective quantities are done on
operands scaled by a power of two. Nothing is ever differentiated through a kernel: every pallas_call sits inside a
`jax.custom_vjp` defined here.

Forward (`pallas_forward.py`; lane-scan form, three launches): lanes own runs of consecutive positions inside
chunks of one row; an in-register scan over the lanes (`backend.associative_scan`, one Triton `tt.scan`) composes
their 2x2 maps, a per-row scan composes the chunks, and a final pass runs every lane's continued fraction
g_t = 1/(d_t - k_t g_{t-1}) from its entering state. The bidirectional diagonal runs both continued fractions in
the same three launches and writes G once.

Backward (`pallas_backward.py`; exact, for a only; b, c, z get zero cotangents as in `xla.py`): a reverse affine
recurrence run as a chunked three-phase scan. The bidirectional gradient recomputes both one-sided resolvents and
pulls the cotangent back through their backward kernels.

`descending=True` runs the same recursions over positions N-1, ..., 0 with the coupling of the bond to the right
(k_{t+1} at position t): the right continued fraction of the bidirectional resolvent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _pallas_backend as backend
from .config import BkScanConfig
from .pallas_backward import resolvent_grad
from .pallas_forward import forward

F32 = jnp.float32


def _zero_cotangent(x):
    return None if x is None else jnp.zeros_like(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _scan(a, kc, zvec, descending, config, interpret, zconst):
    """One-sided resolvent (causal gL, or gR when `descending`) as interleaved (B, 2N), exact VJP for `a`."""
    return forward(a, kc, zvec, "right" if descending else "left", config, interpret, zconst)


def _scan_fwd(a, kc, zvec, descending, config, interpret, zconst):
    g = _scan(a, kc, zvec, descending, config, interpret, zconst)
    return g, (g, kc, zvec, a.shape)


def _scan_bwd(descending, config, interpret, zconst, residuals, ct):
    g, kc, zvec, (batch, n) = residuals
    grad = resolvent_grad(g, ct.astype(F32), kc, batch=batch, n=n, descending=descending, config=config,
                          interpret=interpret)
    return grad, _zero_cotangent(kc), _zero_cotangent(zvec)


_scan.defvjp(_scan_fwd, _scan_bwd)


# ------------------------------------------------------------------------------------------------- public entry

def _static_z(z):
    """(Re z, Im z) as Python floats when z is a Python (or NumPy) number: compiled into the kernels, so a call
    needs no device work to build it. None for arrays and tracers (read by the kernels at run time)."""
    if z is None or isinstance(z, (bool, np.bool_)):
        raise ValueError(f"z must be a complex scalar (a number or a 0-d array), got {z!r}")
    if isinstance(z, (int, float, complex, np.number)):
        z = complex(z)
        return float(z.real), float(z.imag)
    return None


def _prepare(a, b, c, z):
    """(a (B, N) f32, kc (rows, N) f32 or None for unit coupling, z as (2,) f32; None for z = None, which the
    callers pass when z is compiled into the kernels)."""
    a = jnp.asarray(a, F32)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"a must have shape (B, N) with N >= 1, got {a.shape}")
    batch, n = a.shape
    zvec = None
    if z is not None:
        z = jnp.asarray(z, jnp.complex64)
        if z.ndim != 0:
            raise ValueError(f"z must be a scalar, got shape {z.shape}")
        zvec = lax.stop_gradient(jnp.stack([jnp.real(z), jnp.imag(z)]).astype(F32))
    if b is None and c is None:
        return a, None, zvec
    parts = []
    for name, x in (("b", b), ("c", c)):
        x = jnp.ones((n - 1,), F32) if x is None else jnp.asarray(x, F32)
        if x.shape not in ((n - 1,), (batch, n - 1)):
            raise ValueError(f"{name} must have shape ({n - 1},) or ({batch}, {n - 1}) for a of shape "
                             f"({batch}, {n}), got {x.shape}")
        parts.append(x if x.ndim == 2 else x[None])
    bond = lax.stop_gradient(parts[0] * parts[1])
    kc = jnp.concatenate([jnp.zeros((bond.shape[0], 1), F32), bond], axis=1)
    return a, kc, zvec


def _resolve_config(config, interpret):
    backend.require("bk_scan", interpret, alternatives="'xla', 'scan' or 'reference'")
    return BkScanConfig() if config is None else config


@functools.partial(jax.jit, static_argnames=("config", "interpret", "zconst"))
def _causal_features(a, b, c, z, *, config, interpret, zconst):
    a, kc, zvec = _prepare(a, b, c, z)
    g = _scan(a, kc, zvec, False, config, interpret, zconst)
    return g.reshape(a.shape[0], a.shape[1], 2)


def causal_features_pallas(a, b=None, c=None, z=1j, *, config: BkScanConfig | None = None,
                           interpret: bool = False):
    """Causal resolvent g_t = 1/(d_t - k_t g_{t-1}) as features (B, N, 2) float32, exact gradient for `a`.

    A Python number z is compiled into the kernels (one compilation per value); an array z is read at run time."""
    zconst = _static_z(z)
    return _causal_features(a, b, c, None if zconst is not None else z, config=_resolve_config(config, interpret),
                            interpret=bool(interpret), zconst=zconst)


def _combine_sides(a, kc, z, left, right):
    """G from the one-sided resolvents (interleaved (B, 2N) each): the unfused form, differentiated by JAX."""
    batch, n = a.shape
    gl = lax.complex(left[:, 0::2], left[:, 1::2])
    gr = lax.complex(right[:, 0::2], right[:, 1::2])
    k = jnp.ones((1, n), F32).at[:, 0].set(0.0) if kc is None else kc
    zero = jnp.zeros((batch, 1), jnp.complex64)
    from_left = jnp.concatenate([zero, k[:, 1:] * gl[:, :-1]], axis=1)
    from_right = jnp.concatenate([k[:, 1:] * gr[:, 1:], zero], axis=1)
    g = 1.0 / ((a - z) - from_left - from_right)
    return jnp.stack([jnp.real(g), jnp.imag(g)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bidirectional(a, kc, zvec, config, interpret, zconst):
    """G as (B, N, 2) from the fused kernel (both sweeps in one pass, one write of G)."""
    return forward(a, kc, zvec, "both", config, interpret, zconst).reshape(a.shape[0], a.shape[1], 2)


def _bidirectional_fwd(a, kc, zvec, config, interpret, zconst):
    return _bidirectional(a, kc, zvec, config, interpret, zconst), (a, kc, zvec)


def _bidirectional_bwd(config, interpret, zconst, residuals, ct):
    # Recompute both sides with the one-sided kernels and pull the cotangent back through the unfused combination
    # (JAX) and their backward kernels: the forward stays one pass, the gradient is exact.
    a, kc, zvec = residuals
    z = complex(*zconst) if zconst is not None else lax.complex(zvec[0], zvec[1])

    def unfused(a):
        return _combine_sides(a, kc, z, _scan(a, kc, zvec, False, config, interpret, zconst),
                              _scan(a, kc, zvec, True, config, interpret, zconst))

    grad = jax.vjp(unfused, a)[1](ct)[0]
    return grad, _zero_cotangent(kc), _zero_cotangent(zvec)


_bidirectional.defvjp(_bidirectional_fwd, _bidirectional_bwd)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "zconst"))
def _bidirectional_features(a, b, c, z, *, config, interpret, zconst):
    a, kc, zvec = _prepare(a, b, c, z)
    return _bidirectional(a, kc, zvec, config, interpret, zconst)


def bidirectional_features_pallas(a, b=None, c=None, z=1j, *, config: BkScanConfig | None = None,
                                  interpret: bool = False):
    """[(H - zI)^-1]_ii = 1/(d_i - k_i gL_{i-1} - k_{i+1} gR_{i+1}) as features (B, N, 2), exact grad for `a`.

    Forward: one fused kernel pair (both continued fractions in one pass over a, G written once). Backward: the
    one-sided kernels recompute gL and gR, whose backward kernels and the (JAX-differentiated) combination give
    the exact gradient. A Python number z is compiled into the kernels (one compilation per value); an array z is
    read at run time.
    """
    zconst = _static_z(z)
    return _bidirectional_features(a, b, c, None if zconst is not None else z, config=_resolve_config(config, interpret),
                                   interpret=bool(interpret), zconst=zconst)
