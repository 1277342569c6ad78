"""Complex arithmetic on separate real and imaginary float32 planes, and exact power-of-two scaling.

Shared by the XLA path (`xla.py`) and the Pallas kernels (`pallas_forward.py`, `pallas_backward.py`,
`pallas_torch_parity.py`). Planes rather than complex64 because Triton has no complex type, and because explicit
elementwise products cannot be turned into TF32 matmuls. Scaling by a power of two built from the exponent bits is
exact, so the only rounding is that of the arithmetic itself.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

# Exponents applied by bit construction must keep 2**-e a normal float32.
MAX_EXPONENT = 126


def frexp_exponent(magnitude):
    """e with magnitude = m 2**e, m in [0.5, 1), clipped so that 2**-e stays a normal float32 (magnitude >= 0)."""
    bits = lax.bitcast_convert_type(magnitude, jnp.int32)
    return jnp.clip(lax.shift_right_arithmetic(bits, 23) - 126, -MAX_EXPONENT, MAX_EXPONENT)


def pow2(e):
    """2**e as float32, exact, for integer e in [-126, 127] (built from the bits, no exp2 rounding)."""
    return lax.bitcast_convert_type(lax.shift_left(e + 127, 23), jnp.float32)


def _largest_exponent(planes):
    return frexp_exponent(functools.reduce(jnp.maximum, [jnp.abs(p) for p in planes]))


def normalise(planes):
    """The planes scaled by the power of two that brings the largest |entry| into [0.5, 1) (for projective
    quantities, whose scale does not matter)."""
    scale = pow2(-_largest_exponent(planes))
    return [p * scale for p in planes]


def normalise_with_exponent(planes, exponent):
    """`normalise`, keeping the scale: (scaled planes, exponent + the power of two taken out)."""
    shift = _largest_exponent(planes)
    scale = pow2(-shift)
    return [p * scale for p in planes], exponent + shift


def cmul(xr, xi, yr, yi):
    return xr * yr - xi * yi, xr * yi + xi * yr


def cmul_add(xr, xi, yr, yi, ur, ui, vr, vi):
    """x*y + u*v."""
    pr, pi = cmul(xr, xi, yr, yi)
    qr, qi = cmul(ur, ui, vr, vi)
    return pr + qr, pi + qi


def one_over(x):
    return 1.0 / x


def cdiv(xr, xi, yr, yi, reciprocal=one_over):
    """x / y through conj(y) / |y|^2, unscaled: for |y| of order 1 (normalised mantissas) or >= Im z.
    `reciprocal(t)` is 1 / t (a division by default; the kernels may pass `_pallas_backend.reciprocal`)."""
    inverse_norm = reciprocal(yr * yr + yi * yi)
    return (xr * yr + xi * yi) * inverse_norm, (xi * yr - xr * yi) * inverse_norm


def cdiv_scaled(xr, xi, yr, yi, reciprocal):
    """x / y with both first scaled by the power of two that brings max(|Re y|, |Im y|) into [0.5, 1): safe for
    projective quantities of any size."""
    scale = pow2(-frexp_exponent(jnp.maximum(jnp.abs(yr), jnp.abs(yi))))
    return cdiv(xr * scale, xi * scale, yr * scale, yi * scale, reciprocal)


def cinverse(re, im, reciprocal=one_over):
    """1 / (re + i im), unscaled: for denominators whose |.|^2 neither overflows nor underflows (see its callers)."""
    scale = reciprocal(re * re + im * im)
    return re * scale, -im * scale
