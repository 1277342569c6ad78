"""Fast pure-JAX BK-Core: parallel prefix scans over normalised 2x2 Möbius matrices, float32 only.

Notation (REFERENCE_SPEC 1.7): d_i = a_i - z, k_i = b_{i-1} c_{i-1} couples i-1 and i (k_0 = 0). The leading
principal minors theta_t of H - zI obey theta_{t+1} = d_t theta_t - k_t theta_{t-1}, i.e.

    (theta_t, theta_{t+1}) = M_t (theta_{t-1}, theta_t),   M_t = [[0, 1], [-k_t, d_t]],   (theta_{-1}, theta_0) = (0, 1),

so the prefix product P_t = M_t ... M_0 has second column (theta_t, theta_{t+1}), and the causal resolvent
g_t = theta_t / theta_{t+1} = 1/(d_t - k_t g_{t-1}) is the ratio of its entries. The scan normalises every product
by an exact power of two and keeps the integer exponent, so it never overflows, and (mantissa, exponent) pairs give
the unnormalised determinants in an extended range: that is how reference mode emulates complex128 overflow.

Products are written as explicit elementwise float32 arithmetic on real/imaginary planes (no matmul/einsum), so
TF32 cannot touch them and the same code maps onto a Pallas kernel. The scans use recursive doubling in a
fori_loop (`_doubling_scan`) rather than `lax.associative_scan`, whose unrolled levels take 2.5-6 s to compile per
shape on CPU against ~0.35 s here; the price is O(N log N) instead of O(N) work.

Public functions (all jit-able, any B >= 1 and N >= 1; a (B, N) float32; b, c (N-1,) or (B, N-1), None = ones;
z complex scalar, may be traced; output features (B, N, 2) float32 = [Re G, Im G]):
  reference_mode_features  the PyTorch reference forward, overflow cliff included, with its heuristic backward;
  causal_features          g_t, the causal resolvent, with the exact gradient for `a`;
  bidirectional_features   [(H - zI)^-1]_ii, the full-matrix diagonal, with the exact gradient for `a`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .complex_planes import MAX_EXPONENT, cdiv, cmul, cmul_add, frexp_exponent, pow2
from .reference import (
    REFERENCE_CLIP_EPS,
    REFERENCE_DET_EPS,
    REFERENCE_MAX_MAGNITUDE,
    check_and_broadcast,
    reference_heuristic_grad,
)

# A float64 result overflows when its magnitude rounds past DBL_MAX = 2**1024 (1 - 2**-53), i.e. reaches 2**1024
# less half an ulp; float32 mantissas cannot resolve that half ulp, so the test is |x| >= 2**1024.
FLOAT64_OVERFLOW_EXPONENT = 1024


# ----------------------------------------------------------------------------------------------------------------
# Parallel prefix scan, and the Möbius prefix products built on it.
# ----------------------------------------------------------------------------------------------------------------

def _normalise(planes, exponent):
    """Divide the stacked planes (P, ...) by the power of two that brings the largest |entry| into [0.5, 1).

    Exact (a power-of-two scale), so only the products themselves round; the exponent keeps the true scale.
    """
    shift = frexp_exponent(jnp.max(jnp.abs(planes), axis=0))
    return planes * pow2(-shift), exponent + shift


def _doubling_scan(combine, elems, *, reverse=False):
    """Inclusive scan along the last axis by recursive doubling (Hillis-Steele) inside a fori_loop.

    combine(earlier, later) must be associative ("earlier" is the element nearer the start of the scan: position
    t - 2**s, or t + 2**s when reverse). O(N log N) work instead of the O(N) of `lax.associative_scan`, but a single
    compiled combine, where `lax.associative_scan` unrolls ~2 log2 N of them. Position t only ever reads positions
    <= t (>= t when reverse), so changing a later input cannot change an earlier output, not even in the last bit.
    """
    n = elems[0].shape[-1]
    positions = jnp.arange(n)

    def step(level, current):
        distance = jnp.left_shift(1, level)
        earlier = tuple(jnp.roll(x, -distance if reverse else distance, axis=-1) for x in current)
        has_earlier = positions < n - distance if reverse else positions >= distance
        combined = combine(earlier, current)
        return tuple(jnp.where(has_earlier, new, old) for new, old in zip(combined, current))

    return lax.fori_loop(0, (n - 1).bit_length(), step, tuple(elems))


# Plane order of a 2x2 complex matrix [[m00, m01], [m10, m11]].
_M00R, _M00I, _M01R, _M01I, _M10R, _M10I, _M11R, _M11I = range(8)


def _compose(earlier, later):
    """later @ earlier for 2x2 complex matrices stored as (8 stacked planes, power-of-two exponent), renormalised."""
    e, e_exp = earlier
    l, l_exp = later
    product = jnp.stack([
        *cmul_add(l[_M00R], l[_M00I], e[_M00R], e[_M00I], l[_M01R], l[_M01I], e[_M10R], e[_M10I]),
        *cmul_add(l[_M00R], l[_M00I], e[_M01R], e[_M01I], l[_M01R], l[_M01I], e[_M11R], e[_M11I]),
        *cmul_add(l[_M10R], l[_M10I], e[_M00R], e[_M00I], l[_M11R], l[_M11I], e[_M10R], e[_M10I]),
        *cmul_add(l[_M10R], l[_M10I], e[_M01R], e[_M01I], l[_M11R], l[_M11I], e[_M11R], e[_M11I]),
    ])
    return _normalise(product, e_exp + l_exp)


def _mobius_prefix_scan(d_re, d_im, coupling):
    """Prefix products P_t = M_t ... M_0 along the last axis, M_t = [[0, 1], [-coupling_t, d_t]].

    Returns (theta_re, theta_im, next_re, next_im, exponent): the second column of P_t, which is
    (theta_t, theta_{t+1}) = (theta_re + i theta_im, next_re + i next_im) * 2**exponent.
    coupling_0 must be 0 (theta_{-1} = 0 makes it irrelevant anyway).
    """
    zero = jnp.zeros_like(d_re)
    one = jnp.ones_like(d_re)
    leaves = jnp.stack([zero, zero, one, zero, -coupling, zero, d_re, d_im])
    # Normalise the leaves too, so that products of huge entries cannot overflow before the first rescale.
    leaves = _normalise(leaves, jnp.zeros(d_re.shape, jnp.int32))
    planes, exponent = _doubling_scan(_compose, leaves)
    return planes[_M01R], planes[_M01I], planes[_M11R], planes[_M11I], exponent


def _couplings(b, c):
    """k (B, N): k_0 = 0, k_t = b_{t-1} c_{t-1}."""
    bond = b * c
    return jnp.concatenate([jnp.zeros((bond.shape[0], 1), bond.dtype), bond], axis=1)


def _shifted_planes(a, z):
    d_re = a - jnp.real(z)
    d_im = jnp.broadcast_to(-jnp.imag(z), a.shape).astype(jnp.float32)
    return d_re, d_im


def _continued_fraction(d_re, d_im, coupling):
    """g_t = 1/(d_t - k_t g_{t-1}) as complex64, by the parallel scan."""
    theta_re, theta_im, next_re, next_im, _ = _mobius_prefix_scan(d_re, d_im, coupling)
    return lax.complex(*cdiv(theta_re, theta_im, next_re, next_im))


# ----------------------------------------------------------------------------------------------------------------
# Native causal resolvent with its exact gradient.
# ----------------------------------------------------------------------------------------------------------------

def _reverse_affine_scan(multiplier, offset):
    """lambda_t = offset_t + multiplier_t lambda_{t+1} (lambda_N = 0) along axis 1, as a parallel scan.

    The pair (A, c) stands for x -> c + A x; composing the map at t with the already composed maps after it is
    associative, and needs no normalisation here: with A_t = conj(k_{t+1} g_{t+1}^2), k >= 0 and Im z > 0,
    Im g_t = |g_t|^2 (Im z + k_t Im g_{t-1}) gives |A_t| <= Im g_{t+1} / Im g_t, so every product of consecutive
    factors is bounded by a ratio of two Im g values (single factors are <= 1 when k = 1 and Im z = 1). Products
    can only grow large when the exact derivative does (k < 0, or Im z -> 0).
    """
    def compose(after, current):
        after_mul, after_off = after
        current_mul, current_off = current
        return current_mul * after_mul, current_off + current_mul * after_off

    _, lam = _doubling_scan(compose, (multiplier, offset), reverse=True)
    return lam


@jax.custom_vjp
def _causal_planes(a, b, c, z):
    d_re, d_im = _shifted_planes(a, z)
    g = _continued_fraction(d_re, d_im, _couplings(b, c))
    return jnp.real(g), jnp.imag(g)


def _causal_planes_fwd(a, b, c, z):
    d_re, d_im = _shifted_planes(a, z)
    coupling = _couplings(b, c)
    g = _continued_fraction(d_re, d_im, coupling)
    return (jnp.real(g), jnp.imag(g)), (g, coupling, b, c, z)


def _causal_planes_bwd(residuals, cotangents):
    g, coupling, b, c, z = residuals
    upstream = lax.complex(cotangents[0], cotangents[1])
    g_squared = g * g
    # dg_{t+1}/dg_t = k_{t+1} g_{t+1}^2 (holomorphic), so cotangents flow back through its conjugate.
    sensitivity = jnp.conj(coupling * g_squared)
    multiplier = jnp.concatenate([sensitivity[:, 1:], jnp.zeros_like(sensitivity[:, :1])], axis=1)
    lam = _reverse_affine_scan(multiplier, upstream)
    # dg_t/da_t = -g_t^2.
    grad_a = -jnp.real(jnp.conj(lam) * g_squared)
    return grad_a, jnp.zeros_like(b), jnp.zeros_like(c), jnp.zeros_like(z)


_causal_planes.defvjp(_causal_planes_fwd, _causal_planes_bwd)


@jax.jit
def causal_features(a, b=None, c=None, z=1j):
    """Causal resolvent g_t = [(H_{0..t} - z)^-1]_{tt} = 1/(d_t - k_t g_{t-1}), as features (B, N, 2) float32.

    g_t depends on a_0..a_t only. Computed by a parallel scan over power-of-two normalised Möbius matrices, so it
    is finite and accurate at any length. The gradient with respect to `a` is exact (a reverse linear recurrence,
    also a parallel scan); b, c and z get zero cotangents: they are fixed buffers in the model.
    """
    a, b, c, z = check_and_broadcast(a, b, c, z)
    re, im = _causal_planes(a, b, c, z)
    return jnp.stack([re, im], axis=-1)


@jax.jit
def bidirectional_features(a, b=None, c=None, z=1j):
    """Full-matrix diagonal G_ii = [(H - zI)^-1]_ii, as features (B, N, 2) float32 (non-causal: uses all of a).

    G_ii = 1/(d_i - k_i gL_{i-1} - k_{i+1} gR_{i+1}), with gL the causal continued fraction and gR the same on the
    reversed sequence. Both come from the differentiable causal primitive, so the gradient with respect to `a` is
    exact; b, c and z get zero cotangents.
    """
    a, b, c, z = check_and_broadcast(a, b, c, z)
    b, c, z = lax.stop_gradient(b), lax.stop_gradient(c), lax.stop_gradient(z)
    left = lax.complex(*_causal_planes(a, b, c, z))
    right = lax.complex(*_causal_planes(a[:, ::-1], b[:, ::-1], c[:, ::-1], z))[:, ::-1]
    bond = b * c
    zero = jnp.zeros_like(left[:, :1])
    from_left = jnp.concatenate([zero, bond * left[:, :-1]], axis=1)
    from_right = jnp.concatenate([bond * right[:, 1:], zero], axis=1)
    g = 1.0 / ((a - z) - from_left - from_right)
    return jnp.stack([jnp.real(g), jnp.imag(g)], axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# Reference mode: the PyTorch forward in float32, complex128 overflow emulated, heuristic backward.
# ----------------------------------------------------------------------------------------------------------------

def _binary_exponent(x):
    """floor(log2 x) for x > 0, read from the float32 exponent bits; a very negative number for 0 and NaN."""
    biased = lax.bitcast_convert_type(x, jnp.int32) >> 23
    return jnp.where(x > 0, biased - 127, -(1 << 20))


def _overflows(magnitude, exponent):
    """Whether magnitude * 2**exponent reaches 2**1024, where float64 overflows; decided on exponents, exactly."""
    return _binary_exponent(magnitude) + exponent >= FLOAT64_OVERFLOW_EXPONENT


def _larger_part(re, im):
    return jnp.maximum(jnp.abs(re), jnp.abs(im))


def _sweep_step_overflows(d_re, d_im, coupling, current, previous, following):
    """Whether any float64 intermediate of x_{t+1} = d_t*x_t - (c*b)*x_{t-1} overflows.

    Each x is (re, im, exponent) with x = (re + i im) 2**exponent. The intermediates of the reference's naive
    complex arithmetic are: the four real products Re/Im d * Re/Im x_t and the two components of d_t x_t;
    the two components of (c b) x_{t-1}; and the two components of x_{t+1} itself.
    """
    cur_re, cur_im, cur_exp = current
    prev_re, prev_im, prev_exp = previous
    next_re, next_im, next_exp = following
    prod_re, prod_im = cmul(d_re, d_im, cur_re, cur_im)
    largest_current = jnp.maximum(_larger_part(d_re, d_im) * _larger_part(cur_re, cur_im),
                                  _larger_part(prod_re, prod_im))
    return (_overflows(largest_current, cur_exp)
            | _overflows(jnp.abs(coupling) * _larger_part(prev_re, prev_im), prev_exp)
            | _overflows(_larger_part(next_re, next_im), next_exp))


def _shift_right(x, fill):
    """x[t-1] at position t (fill at t = 0)."""
    return jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)


def _scale_by_power_of_two(re, im, exponent):
    scale = pow2(jnp.clip(exponent, -MAX_EXPONENT, MAX_EXPONENT))
    return re * scale, im * scale


def _reference_mode_resolvent(a, b, c, z, prefix_scan=_mobius_prefix_scan):
    """G of the reference (after eps, NaN-zeroing, overflow cliff and the 50-clip), complex64 (B, N).

    `prefix_scan` computes the three stacked sweeps: any function with the contract of `_mobius_prefix_scan`
    (the Pallas kernel `pallas_torch_parity.mobius_prefix_scan_pallas` is the other one), so that every line of the
    combination and cliff logic below is shared between implementations. Its mantissas must be normalised (largest
    |Re|/|Im| of each (theta_t, theta_{t+1}) pair in [0.5, 1)), as the divisions below assume O(1) operands.

    Value: G_i = theta_i phi_i / (det + 1e-18), computed as the ratio form of the true resolvent diagonal,
      1/(d_i - k_i gL_{i-1} - k_{i+1} gR_{i+1}),
    times phi_i / psi_{i+1} (the reference's phi sweep over its true value psi; exactly 1 for uniform b, c),
    times det / (det + 1e-18).

    Overflow cliff (the reference runs in complex128 with unnormalised determinants). theta, phi and det are held
    as float32 mantissa * 2**integer exponent; an intermediate of the reference's complex128 arithmetic
    "overflows" when its magnitude, evaluated from those mantissas and exponents, reaches 2**1024 (DBL_MAX rounds
    up to it). The features are zeroed:
      * for the whole row, if any intermediate of the theta sweep (steps producing theta_2..theta_N, see
        `_sweep_step_overflows`) overflows, since the non-finite value propagates into det; or if the denominator
        of the complex division (Smith's algorithm, as NumPy and torch: |det|^2 / max(|Re det|, |Im det|))
        overflows, which makes the quotient 0;
      * at positions j <= i, if an intermediate of the phi sweep step producing phi_i overflows (it propagates
        down the sweep);
      * at position i, if a component of the numerator theta_i phi_i (real products or sums) or of Smith's scaled
        numerator (Re/Im of num * conj(det) / max(|Re det|, |Im det|)) overflows.
    The mantissas carry ~1e-6 relative error, so a case within ~1e-6 (relative) of 2**1024 may go either way;
    elsewhere the zero pattern is that of complex128.
    """
    batch, n = a.shape
    d_re, d_im = _shifted_planes(a, z)
    if n == 1:
        # theta_0 = phi_0 = 1 and det = d_0: the reference computes 1/(d_0 + 1e-18) and nothing can overflow.
        return _zero_non_finite_and_clip(1.0 / lax.complex(d_re + REFERENCE_DET_EPS, d_im))
    bond = b * c
    reversed_bond = bond[:, ::-1]
    zero_column = jnp.zeros_like(a[:, :1])
    left_coupling = jnp.concatenate([zero_column, bond], axis=1)
    right_coupling = jnp.concatenate([zero_column, reversed_bond], axis=1)
    # The reference's phi sweep uses the bond one position to the left of the true one; the last entry is never
    # used by the reference and is set so that uniform bonds make both right scans bit-identical.
    phi_coupling = jnp.concatenate([zero_column, reversed_bond[:, 1:], bond[:, :1]], axis=1)

    # One parallel scan over the three sweeps stacked along the batch axis.
    stacked = prefix_scan(
        jnp.concatenate([d_re, d_re[:, ::-1], d_re[:, ::-1]]),
        jnp.concatenate([d_im, d_im[:, ::-1], d_im[:, ::-1]]),
        jnp.concatenate([left_coupling, right_coupling, phi_coupling]),
    )
    left, right, phi = ([part[i * batch:(i + 1) * batch] for part in stacked] for i in range(3))
    th_re, th_im, thn_re, thn_im, th_exp = left            # (theta_t, theta_{t+1}) * 2**th_exp
    ps_re, ps_im, psn_re, psn_im, ps_exp = right           # (psi_{N-s}, psi_{N-1-s}), s = reversed position
    ph_re, ph_im, phn_re, phn_im, ph_exp = phi             # (phi_{N-1-s}, phi_{N-2-s})

    # Ratio form of the true resolvent diagonal.
    gl_re, gl_im = cdiv(th_re, th_im, thn_re, thn_im)
    gr_re, gr_im = (x[:, ::-1] for x in cdiv(ps_re, ps_im, psn_re, psn_im))
    from_left_re = jnp.concatenate([zero_column, bond * gl_re[:, :-1]], axis=1)
    from_left_im = jnp.concatenate([zero_column, bond * gl_im[:, :-1]], axis=1)
    from_right_re = jnp.concatenate([bond * gr_re[:, 1:], zero_column], axis=1)
    from_right_im = jnp.concatenate([bond * gr_im[:, 1:], zero_column], axis=1)
    g_re, g_im = cdiv(1.0, 0.0, d_re - from_left_re - from_right_re, d_im - from_left_im - from_right_im)

    # phi_i / psi_{i+1}: both are first entries at the same reversed position.
    ratio_re, ratio_im = _scale_by_power_of_two(*cdiv(ph_re, ph_im, ps_re, ps_im), ph_exp - ps_exp)
    g_re, g_im = cmul(g_re, g_im, ratio_re[:, ::-1], ratio_im[:, ::-1])

    # det / (det + eps) = 1 / (1 + eps / det), with eps / det kept in range through the exponent.
    det_re, det_im, det_exp = thn_re[:, -1:], thn_im[:, -1:], th_exp[:, -1:]
    eps_re, eps_im = _scale_by_power_of_two(*cdiv(REFERENCE_DET_EPS, 0.0, det_re, det_im), -det_exp)
    g_re, g_im = cdiv(g_re, g_im, 1.0 + eps_re, eps_im)

    # --- Overflow cliff. ---
    theta_overflow = _sweep_step_overflows(
        d_re, d_im, left_coupling,
        (th_re, th_im, th_exp),
        (_shift_right(th_re, 0.0), _shift_right(th_im, 0.0), _shift_right(th_exp, 0)),
        (thn_re, thn_im, th_exp),
    )[:, 1:]  # steps t = 1..N-1 produce theta_2..theta_N
    det_larger = _larger_part(det_re, det_im)
    division_overflow = _overflows((det_re * det_re + det_im * det_im) / det_larger, det_exp)
    row_zero = jnp.any(theta_overflow, axis=1, keepdims=True) | division_overflow

    phi_step_overflow = _sweep_step_overflows(
        d_re[:, ::-1], d_im[:, ::-1], phi_coupling,
        (ph_re, ph_im, ph_exp),
        (_shift_right(ph_re, 0.0), _shift_right(ph_im, 0.0), _shift_right(ph_exp, 0)),
        (phn_re, phn_im, ph_exp),
    )
    # Steps s = 1..N-2 exist in the reference; step s poisons phi at reversed positions > s.
    steps = jnp.arange(n)
    phi_step_overflow = phi_step_overflow & (steps >= 1) & (steps <= n - 2)
    phi_poisoned = _shift_right(lax.cummax(phi_step_overflow.astype(jnp.int32), axis=1), 0)[:, ::-1] > 0

    # Numerator theta_i phi_i and Smith's scaled numerator.
    phi_re, phi_im, phi_exp = ph_re[:, ::-1], ph_im[:, ::-1], ph_exp[:, ::-1]
    num_re, num_im = cmul(th_re, th_im, phi_re, phi_im)
    scaled_re, scaled_im = cmul(num_re, num_im, det_re, -det_im)
    largest_numerator = jnp.maximum(
        jnp.maximum(_larger_part(th_re, th_im) * _larger_part(phi_re, phi_im), _larger_part(num_re, num_im)),
        _larger_part(scaled_re, scaled_im) / det_larger)
    numerator_overflow = _overflows(largest_numerator, th_exp + phi_exp)

    cliff = row_zero | phi_poisoned | numerator_overflow
    return _zero_non_finite_and_clip(jnp.where(cliff, 0.0, lax.complex(g_re, g_im)))


def _zero_non_finite_and_clip(g):
    """Steps 5-6 of the reference: non-finite G -> 0, then |G| > 50 scaled back to 50."""
    g = jnp.where(jnp.isfinite(g), g, 0.0).astype(jnp.complex64)
    magnitude = jnp.abs(g)
    clip_factor = jnp.where(magnitude > REFERENCE_MAX_MAGNITUDE,
                            REFERENCE_MAX_MAGNITUDE / (magnitude + REFERENCE_CLIP_EPS), 1.0)
    return g * clip_factor


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _reference_mode(a, b, c, z, prefix_scan):
    """Reference-mode features (B, N, 2) with the heuristic backward; `prefix_scan` as in `_reference_mode_resolvent`
    (never differentiated: the backward reads only G and the cotangent)."""
    g = _reference_mode_resolvent(a, b, c, z, prefix_scan)
    return jnp.stack([jnp.real(g), jnp.imag(g)], axis=-1)


def _reference_mode_fwd(a, b, c, z, prefix_scan):
    g = _reference_mode_resolvent(a, b, c, z, prefix_scan)
    return jnp.stack([jnp.real(g), jnp.imag(g)], axis=-1), (g, b, c, z)


def _reference_mode_bwd(prefix_scan, residuals, cotangent):
    g, b, c, z = residuals
    return reference_heuristic_grad(g, cotangent), jnp.zeros_like(b), jnp.zeros_like(c), jnp.zeros_like(z)


_reference_mode.defvjp(_reference_mode_fwd, _reference_mode_bwd)


@jax.jit
def reference_mode_features(a, b=None, c=None, z=1j):
    """The PyTorch reference BK-Core (REFERENCE_SPEC 1.7/1.8) in float32, without x64, as features (B, N, 2).

    Forward: the full-matrix diagonal with the reference's eps, NaN-zeroing and 50-clip, and its complex128
    overflow cliff emulated from log-magnitudes (see `_reference_mode_resolvent` for the exact criterion): e.g.
    for constant v (a = -2 + v, b = c = 1, z = 1j) rows are all zero from N = 446 (v = -3) to 1338 (v = 3).
    Backward: the reference's heuristic gradient (1.8, not the true derivative), for `a` only; b, c and z get zero
    cotangents. The recurrences are never differentiated.
    """
    return reference_mode_features_from_scan(a, b, c, z, _mobius_prefix_scan)


def reference_mode_features_from_scan(a, b, c, z, prefix_scan):
    """`reference_mode_features` with its three sweeps computed by `prefix_scan` (a function with the contract of
    `_mobius_prefix_scan`, e.g. the Pallas kernel `pallas_torch_parity.mobius_prefix_scan_pallas`); not jitted."""
    a, b, c, z = check_and_broadcast(a, b, c, z)
    return _reference_mode(a, b, c, z, prefix_scan)
