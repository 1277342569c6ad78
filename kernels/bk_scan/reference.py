"""Obvious, slow and correct BK-Core versions: the oracles that `xla.py` is tested against.

Notation (REFERENCE_SPEC 1.7): H is tridiagonal with diagonal a_i, super-diagonal b_i and sub-diagonal c_i;
d_i = a_i - z, and k_i = b_{i-1} c_{i-1} couples positions i-1 and i (k_0 = 0).

* NumPy, complex128 (test oracles, not traceable):
  `reference_mode_forward_numpy` is the PyTorch reference forward step by step, overflow cliff included;
  `causal_numpy` / `bidirectional_numpy` are the continued fractions; `dense_*_numpy` use explicit inverses.
* JAX, complex64, `lax.scan` (differentiable by plain autodiff, used as gradient references):
  `causal_scan_reference`, `bidirectional_scan_reference`.
* JAX, exact reference semantics: `reference_mode_features_host` runs `reference_mode_forward_numpy` on the host
  through `jax.pure_callback` and carries the reference's heuristic backward (`reference_heuristic_grad`).

Every JAX function takes a (B, N) float32, b and c of shape (N-1,) or (B, N-1) (None means all ones) and a complex
scalar z, and returns features of shape (B, N, 2) float32: [..., 0] = Re G, [..., 1] = Im G.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Constants of the PyTorch reference (REFERENCE_SPEC 1.7 and 1.8).
REFERENCE_DET_EPS = 1e-18
REFERENCE_MAX_MAGNITUDE = 50.0
REFERENCE_CLIP_EPS = 1e-9
GRAD_MIN_DENOM = 1e-3
GRAD_DENOM_EPS = 1e-9
GRAD_H7_EPS = 1e-6
GRAD_BLEND = 0.5
GRAD_CLAMP = 1000.0


# ----------------------------------------------------------------------------------------------------------------
# Input handling shared by every implementation.
# ----------------------------------------------------------------------------------------------------------------

def check_and_broadcast(a, b, c, z):
    """Validate shapes and return (a (B, N) float32, b (B, N-1) float32, c (B, N-1) float32, z complex64 scalar)."""
    a = jnp.asarray(a, jnp.float32)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"a must have shape (B, N) with N >= 1, got {a.shape}")
    batch, n = a.shape
    b = _off_diagonal(b, "b", batch, n)
    c = _off_diagonal(c, "c", batch, n)
    z = jnp.asarray(z, jnp.complex64)
    if z.ndim != 0:
        raise ValueError(f"z must be a scalar, got shape {z.shape}")
    return a, b, c, z


def _off_diagonal(x, name, batch, n):
    if x is None:
        return jnp.ones((batch, n - 1), jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    if x.shape not in ((n - 1,), (batch, n - 1)):
        raise ValueError(f"{name} must have shape ({n - 1},) or ({batch}, {n - 1}) for a of shape ({batch}, {n}), "
                         f"got {x.shape}")
    return jnp.broadcast_to(x, (batch, n - 1))


def to_features(g):
    """complex (B, N) -> float32 features (B, N, 2)."""
    return jnp.stack([jnp.real(g), jnp.imag(g)], axis=-1).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# NumPy complex128 oracles.
# ----------------------------------------------------------------------------------------------------------------

def _numpy_inputs(a, b, c, z):
    """Inputs widened to complex128 / float64 without rounding (float64 inputs stay exact, for finite differences)."""
    a = np.asarray(a, np.float64)
    if a.ndim != 2:
        raise ValueError(f"a must have shape (B, N), got {a.shape}")
    batch, n = a.shape
    b = np.ones(n - 1) if b is None else np.asarray(b, np.float64)
    c = np.ones(n - 1) if c is None else np.asarray(c, np.float64)
    b = np.broadcast_to(b, (batch, n - 1))
    c = np.broadcast_to(c, (batch, n - 1))
    z = complex(z)
    d = a.astype(np.complex128) - z
    return d, b, c, z


def _float32_inputs(a, b, c, z):
    """What the PyTorch reference receives: float32 tensors and a complex64 z."""
    a = np.asarray(a, np.float32)
    b = None if b is None else np.asarray(b, np.float32)
    c = None if c is None else np.asarray(c, np.float32)
    return a, b, c, np.complex64(z)


def numpy_to_features(g):
    g = np.asarray(g).astype(np.complex64)
    return np.stack([g.real, g.imag], axis=-1).astype(np.float32)


def reference_mode_forward_numpy(a, b=None, c=None, z=1j):
    """The PyTorch reference forward (REFERENCE_SPEC 1.7, steps 1-7), literally, in complex128.

    The determinants theta/phi are unnormalised, so for long sequences they overflow complex128 and the features
    silently become 0 (the "overflow cliff"). Note the reference's phi sweep couples phi_i to phi_{i+2} with
    c_i b_i, one bond to the left of the textbook expansion; this only matters for non-uniform b, c and is kept.
    Returns features (B, N, 2) float32.
    """
    d, b, c, _ = _numpy_inputs(*_float32_inputs(a, b, c, z))
    batch, n = d.shape
    bond = c.astype(np.complex128) * b.astype(np.complex128)  # complex128 product, as in the reference
    # Overflow to inf/nan is the behaviour being reproduced, not an accident.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        theta = np.empty((batch, n + 1), np.complex128)
        theta[:, 0] = 1.0
        theta[:, 1] = d[:, 0]
        for k in range(1, n):
            theta[:, k + 1] = d[:, k] * theta[:, k] - bond[:, k - 1] * theta[:, k - 1]
        phi = np.empty((batch, n), np.complex128)
        phi[:, n - 1] = 1.0
        if n > 1:
            phi[:, n - 2] = d[:, n - 1]
            for i in range(n - 3, -1, -1):
                phi[:, i] = d[:, i + 1] * phi[:, i + 1] - bond[:, i] * phi[:, i + 2]
        det = theta[:, n:]
        g = theta[:, :n] * phi / (det + REFERENCE_DET_EPS)
        g = np.where(np.isfinite(g), g, 0.0)
        magnitude = np.abs(g)
        g = g * np.where(magnitude > REFERENCE_MAX_MAGNITUDE,
                         REFERENCE_MAX_MAGNITUDE / (magnitude + REFERENCE_CLIP_EPS), 1.0)
    return numpy_to_features(g)


def _continued_fraction_numpy(d, coupling):
    """g_0 = 1/d_0, g_t = 1/(d_t - coupling_t g_{t-1}); d (B, N) complex128, coupling (B, N) with coupling_0 unused."""
    g = np.empty_like(d)
    g[:, 0] = 1.0 / d[:, 0]
    for t in range(1, d.shape[1]):
        g[:, t] = 1.0 / (d[:, t] - coupling[:, t] * g[:, t - 1])
    return g


def _couplings_numpy(b, c):
    """k (B, N) with k_0 = 0 and k_t = b_{t-1} c_{t-1}."""
    bond = b * c
    return np.concatenate([np.zeros((bond.shape[0], 1), bond.dtype), bond], axis=1)


def causal_numpy(a, b=None, c=None, z=1j):
    """Causal resolvent g_t = [(H_{0..t} - z)^-1]_{tt} (last diagonal entry of the leading block), complex128 (B, N)."""
    d, b, c, _ = _numpy_inputs(a, b, c, z)
    return _continued_fraction_numpy(d, _couplings_numpy(b, c))


def bidirectional_numpy(a, b=None, c=None, z=1j):
    """Full-matrix diagonal [(H - zI)^-1]_ii from left and right continued fractions, complex128 (B, N)."""
    d, b, c, _ = _numpy_inputs(a, b, c, z)
    k = _couplings_numpy(b, c)
    left = _continued_fraction_numpy(d, k)
    right = _continued_fraction_numpy(d[:, ::-1], _couplings_numpy(b[:, ::-1], c[:, ::-1]))[:, ::-1]
    denominator = d.copy()
    denominator[:, 1:] -= k[:, 1:] * left[:, :-1]
    denominator[:, :-1] -= k[:, 1:] * right[:, 1:]
    return 1.0 / denominator


def _dense_shifted_matrix(d_row, b_row, c_row):
    n = d_row.shape[0]
    h = np.diag(d_row).astype(np.complex128)
    h[np.arange(n - 1), np.arange(1, n)] = b_row
    h[np.arange(1, n), np.arange(n - 1)] = c_row
    return h


def dense_causal_numpy(a, b=None, c=None, z=1j):
    """g_t from an explicit complex128 inverse of each leading (t+1)x(t+1) block of H - zI. O(N^4): small N only."""
    d, b, c, _ = _numpy_inputs(a, b, c, z)
    batch, n = d.shape
    out = np.empty((batch, n), np.complex128)
    for row in range(batch):
        full = _dense_shifted_matrix(d[row], b[row], c[row])
        for t in range(n):
            unit = np.zeros(t + 1, np.complex128)
            unit[t] = 1.0
            out[row, t] = np.linalg.solve(full[:t + 1, :t + 1], unit)[t]
    return out


def dense_bidirectional_numpy(a, b=None, c=None, z=1j):
    """diag((H - zI)^-1) from an explicit complex128 inverse. Small N only."""
    d, b, c, _ = _numpy_inputs(a, b, c, z)
    return np.stack([np.diag(np.linalg.inv(_dense_shifted_matrix(d[r], b[r], c[r]))) for r in range(d.shape[0])])


def reference_heuristic_grad_numpy(g, cotangent):
    """REFERENCE_SPEC 1.8 steps 1-6 in NumPy complex64/float32: g (B, N) complex, cotangent (B, N, 2) -> (B, N)."""
    g = np.asarray(g, np.complex64)
    cotangent = np.asarray(cotangent, np.float32)
    upstream = (cotangent[..., 0] + 1j * cotangent[..., 1]).astype(np.complex64)
    with np.errstate(all="ignore"):
        square = g * g
        magnitude = np.abs(square)
        raised = (square / (magnitude + np.float32(GRAD_DENOM_EPS)) * np.float32(GRAD_MIN_DENOM)).astype(np.complex64)
        denom = np.where(magnitude >= np.float32(GRAD_MIN_DENOM), square, raised)
        analytic = -(upstream * square).real
        h7 = -(upstream / (denom + np.float32(GRAD_H7_EPS))).real
        grad = np.float32(1 - GRAD_BLEND) * analytic + np.float32(GRAD_BLEND) * h7
        grad = np.where(np.isfinite(grad), grad, 0)
    return np.clip(grad, -GRAD_CLAMP, GRAD_CLAMP).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# JAX lax.scan references (complex64, sequential, differentiable by autodiff).
# ----------------------------------------------------------------------------------------------------------------

def _continued_fraction_scan(d, coupling):
    """g_t = 1/(d_t - coupling_t g_{t-1}) along axis 1 with lax.scan; d complex64 (B, N), coupling (B, N)."""
    def step(previous, inputs):
        d_t, coupling_t = inputs
        current = 1.0 / (d_t - coupling_t * previous)
        return current, current

    start = jnp.zeros(d.shape[:1], d.dtype)
    _, g = lax.scan(step, start, (d.T, coupling.T.astype(d.dtype)))
    return g.T


def _couplings(b, c):
    bond = b * c
    return jnp.concatenate([jnp.zeros((bond.shape[0], 1), bond.dtype), bond], axis=1)


@jax.jit
def causal_scan_reference(a, b=None, c=None, z=1j):
    """Causal resolvent diagonal g_t as features (B, N, 2), by a sequential complex64 lax.scan."""
    a, b, c, z = check_and_broadcast(a, b, c, z)
    return to_features(_continued_fraction_scan(a - z, _couplings(b, c)))


@jax.jit
def bidirectional_scan_reference(a, b=None, c=None, z=1j):
    """Full-matrix diagonal [(H - zI)^-1]_ii as features (B, N, 2), from two sequential complex64 lax.scans."""
    a, b, c, z = check_and_broadcast(a, b, c, z)
    d = a - z
    k = _couplings(b, c)
    left = _continued_fraction_scan(d, k)
    right = _continued_fraction_scan(d[:, ::-1], _couplings(b[:, ::-1], c[:, ::-1]))[:, ::-1]
    zero = jnp.zeros_like(d[:, :1])
    from_left = jnp.concatenate([zero, k[:, 1:] * left[:, :-1]], axis=1)
    from_right = jnp.concatenate([k[:, 1:] * right[:, 1:], zero], axis=1)
    return to_features(1.0 / (d - from_left - from_right))


# ----------------------------------------------------------------------------------------------------------------
# The reference's heuristic backward, and the exact reference forward run on the host.
# ----------------------------------------------------------------------------------------------------------------

def reference_heuristic_grad(g, cotangent):
    """REFERENCE_SPEC 1.8 steps 1-6 in complex64: the reference's gradient for `a` (not the true derivative).

    g: complex64 (B, N), the saved forward output after the clip; cotangent: (B, N, 2) for the features.
    """
    upstream = lax.complex(cotangent[..., 0].astype(jnp.float32), cotangent[..., 1].astype(jnp.float32))
    square = g * g
    magnitude = jnp.abs(square)
    # Keep the phase of G^2 but raise its magnitude to 1e-3 where it is smaller, so 1/G^2 stays bounded.
    raised = square / (magnitude + GRAD_DENOM_EPS) * GRAD_MIN_DENOM
    denom = jnp.where(magnitude >= GRAD_MIN_DENOM, square, raised)
    analytic = -jnp.real(upstream * square)
    hypothesis7 = -jnp.real(upstream / (denom + GRAD_H7_EPS))
    grad = (1.0 - GRAD_BLEND) * analytic + GRAD_BLEND * hypothesis7
    grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
    return jnp.clip(grad, -GRAD_CLAMP, GRAD_CLAMP).astype(jnp.float32)


def _host_forward(a, b, c, z):
    features = jax.pure_callback(
        lambda a_, b_, c_, z_: reference_mode_forward_numpy(a_, b_, c_, complex(z_)),
        jax.ShapeDtypeStruct(a.shape + (2,), jnp.float32),
        a, b, c, z,
        vmap_method="sequential",
    )
    return features


@jax.custom_vjp
def _reference_mode_host(a, b, c, z):
    return _host_forward(a, b, c, z)


def _reference_mode_host_fwd(a, b, c, z):
    features = _host_forward(a, b, c, z)
    return features, (lax.complex(features[..., 0], features[..., 1]), b, c, z)


def _reference_mode_host_bwd(residuals, cotangent):
    g, b, c, z = residuals
    return reference_heuristic_grad(g, cotangent), jnp.zeros_like(b), jnp.zeros_like(c), jnp.zeros_like(z)


_reference_mode_host.defvjp(_reference_mode_host_fwd, _reference_mode_host_bwd)


@jax.jit
def reference_mode_features_host(a, b=None, c=None, z=1j):
    """Exact reference forward (complex128 on the host via `jax.pure_callback`), reference heuristic backward.

    Slow and synchronous (the device waits for the host); jit-able. The gradient goes to `a` only; b, c and z get
    zero cotangents, as in the reference.
    """
    a, b, c, z = check_and_broadcast(a, b, c, z)
    return _reference_mode_host(a, b, c, z)
