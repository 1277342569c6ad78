"""BK-Core op (kernels/bk_scan): every implementation and the dispatcher.

* Reference numerics (the PyTorch model's values): the XLA path against the complex128 NumPy reference, overflow
  cliff and heuristic gradient included; the torch-parity Pallas kernel (`pallas_torch_parity.py`) against the XLA
  path.
* Native numerics, causal and bidirectional: the XLA path against dense inverses, sequential scans and finite
  differences; the Pallas kernels (`pallas.py`) against the NumPy oracles and the sequential scans.
* GPU-only checks of the compiled kernels at full length, and the dispatcher.

Tiers as markers (tests/helpers.py): `interpret` runs the Pallas kernels in the interpreter on a CPU (compiled on a
GPU), `gpu` the compiled kernels only. Kernel block sizes are small here so that every small case has at least
three chunks, several programs and a partial last chunk.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (IGNORE_TRITON_DEPRECATION, INTERPRET, KERNELS_RUN_HERE, ON_GPU, elementwise_rel_err, rel_err,
                     single_line_naming)
from phase1_jax.kernels import _pallas_backend
from phase1_jax.kernels.bk_scan import (
    IMPLEMENTATIONS,
    available_implementations,
    bidirectional_features,
    bidirectional_numpy,
    bidirectional_scan_reference,
    bk_features,
    causal_features,
    causal_numpy,
    causal_scan_reference,
    dense_bidirectional_numpy,
    dense_causal_numpy,
    reference_heuristic_grad,
    reference_heuristic_grad_numpy,
    reference_mode_features,
    reference_mode_features_host,
    reference_mode_forward_numpy,
    resolve,
    xla,
)
from phase1_jax.kernels.bk_scan.config import BkScanConfig
from phase1_jax.kernels.bk_scan.pallas import bidirectional_features_pallas, causal_features_pallas
from phase1_jax.kernels.bk_scan.pallas_torch_parity import mobius_prefix_scan_pallas, reference_mode_features_pallas

pytestmark = IGNORE_TRITON_DEPRECATION

RTOL = 1e-5  # the project's bar for float32 against an exact answer
LOG_DBL_MAX = float(np.log(np.finfo(np.float64).max))


def potential(rng, batch, n, low=-3.0, high=3.0):
    """he = h0_diag + v = -2 + v, rounded to float32 like the model's."""
    return (np.float32(-2.0) + rng.uniform(low, high, (batch, n)).astype(np.float32)).astype(np.float32)


def off_diagonals(rng, n):
    return rng.uniform(0.5, 1.5, n - 1).astype(np.float32), rng.uniform(0.5, 1.5, n - 1).astype(np.float32)


def as_complex(features):
    features = np.asarray(features, np.float64)
    return features[..., 0] + 1j * features[..., 1]


def max_relative_error(features, exact):
    return float(np.max(np.abs(as_complex(features) - exact) / np.abs(exact)))


def weighted_loss(weights):
    return lambda features: jnp.sum(jnp.asarray(weights) * features)


def finite_difference_gradient(oracle, a, b, c, z, weights, step=1e-6):
    """Central differences in float64 of sum(weights * [Re g, Im g]) with respect to every a_ij."""
    a = np.asarray(a, np.float64)

    def loss(x):
        g = oracle(x, b, c, z)
        return np.sum(weights[..., 0] * g.real + weights[..., 1] * g.imag)

    grad = np.empty_like(a)
    for index in np.ndindex(a.shape):
        shift = np.zeros_like(a)
        shift[index] = step
        grad[index] = (loss(a + shift) - loss(a - shift)) / (2 * step)
    return grad


# ----------------------------------------------------------------------------------------------------------------
# Reference numerics: the XLA path against the complex128 NumPy reference.
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 17, 32, 100, 300, 500])
def test_reference_forward_matches_complex128_reference(n):
    rng = np.random.default_rng(n)
    a = potential(rng, 4, n)
    expected = reference_mode_forward_numpy(a)
    got = np.asarray(reference_mode_features(a, None, None, 1j))
    assert got.shape == (4, n, 2) and got.dtype == np.float32
    assert np.all(np.abs(as_complex(expected)) > 0.01)  # below the cliff: a real comparison, not 0 == 0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_reference_forward_with_nonuniform_off_diagonals():
    # The reference's phi sweep uses the bond one position to the left of the true expansion; kept on purpose.
    rng = np.random.default_rng(1)
    a = potential(rng, 3, 40)
    b = rng.uniform(0.5, 1.5, (3, 39)).astype(np.float32)  # one super-diagonal per row
    _, c = off_diagonals(rng, 40)
    expected = reference_mode_forward_numpy(a, b, c)
    assert not np.allclose(as_complex(expected), dense_bidirectional_numpy(a, b, c), atol=1e-3)
    np.testing.assert_allclose(reference_mode_features(a, b, c, 1j), expected, rtol=0, atol=RTOL)


@pytest.mark.parametrize("values, cliff", [((-3.0,), 446), ((-1.0,), 664), ((0.0,), 969), ((1.0, 3.0), 1338)])
def test_reference_overflow_cliff_table(values, cliff):
    """REFERENCE_SPEC 1.7: first N at which a constant potential gives all-zero features."""
    for n, all_zero in ((cliff - 1, False), (cliff, True)):
        a = np.stack([np.full(n, np.float32(-2.0) + np.float32(v), np.float32) for v in values])
        expected = reference_mode_forward_numpy(a)
        got = np.asarray(reference_mode_features(a, None, None, 1j))
        assert np.all(expected == 0) == all_zero and np.all(np.any(expected != 0, axis=-1)) != all_zero
        if all_zero:
            assert np.all(got == 0)
        else:
            assert np.all(np.any(got != 0, axis=-1))
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_reference_overflow_cliff_random_potential():
    rng = np.random.default_rng(7)
    short = potential(rng, 4, 512)
    got = np.asarray(reference_mode_features(short, None, None, 1j))
    assert np.all(np.any(got != 0, axis=-1))
    np.testing.assert_allclose(got, reference_mode_forward_numpy(short), rtol=0, atol=1e-6)
    long = potential(rng, 4, 1024)
    assert np.all(reference_mode_forward_numpy(long) == 0)
    assert np.all(np.asarray(reference_mode_features(long, None, None, 1j)) == 0)


def test_reference_zero_pattern_right_at_the_cliff():
    """Rows tuned so that log|det| lies within 0.05 of log(DBL_MAX): the emulated overflow decides as complex128."""
    rng = np.random.default_rng(3)
    batch, n = 64, 800
    v = rng.uniform(-3, 3, (batch, n))
    target = LOG_DBL_MAX + rng.uniform(-0.05, 0.05, batch)
    low, high = np.zeros(batch), np.full(batch, 6.0)
    for _ in range(30):  # bisect a per-row scale of the potential
        middle = (low + high) / 2
        log_det = -np.log(np.abs(causal_numpy((-2 + middle[:, None] * v).astype(np.float32)))).sum(axis=1)
        above = log_det > target
        high, low = np.where(above, middle, high), np.where(above, low, middle)
    a = (-2 + high[:, None] * v).astype(np.float32)
    expected = reference_mode_forward_numpy(a)
    zero_rows = np.all(expected == 0, axis=(1, 2))
    assert 0 < zero_rows.sum() < batch  # both sides of the cliff are exercised
    np.testing.assert_allclose(reference_mode_features(a, None, None, 1j), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("a0, z", [(-2.5, 1j), (0.5, 0.5 + 0.001j), (0.5, 0.5 + 0j)])
def test_reference_single_site(a0, z):
    """N = 1: G = 1/(d_0 + 1e-18); |G| = 1000 and |G| = 1e18 (d_0 = 0) are scaled back to 50."""
    a = np.array([[a0]], np.float32)
    g = 1.0 / (complex(a0) - complex(np.complex64(z)) + 1e-18)
    if abs(g) > 50:
        g *= 50 / (abs(g) + 1e-9)
    got = np.asarray(reference_mode_features(a, None, None, z))
    np.testing.assert_allclose(as_complex(got)[0, 0], g, rtol=1e-6)
    np.testing.assert_allclose(got, reference_mode_forward_numpy(a, None, None, z), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [64, 1024])  # below and beyond the cliff (G = 0 makes the 1/G^2 term hit the clamp)
def test_reference_vjp_is_the_heuristic_backward(n):
    rng = np.random.default_rng(n)
    a = potential(rng, 3, n)
    b = np.ones(n - 1, np.float32)
    c = np.ones(n - 1, np.float32)
    z = jnp.complex64(1j)
    scale = np.where(rng.uniform(size=(3, n, 1)) < 0.3, 5000.0, 1.0)  # large cotangents: the +-1000 clamp binds
    cotangent = (rng.normal(size=(3, n, 2)) * scale).astype(np.float32)
    features, vjp = jax.vjp(reference_mode_features, a, b, c, z)
    grad_a, grad_b, grad_c, grad_z = vjp(jnp.asarray(cotangent))
    expected = reference_heuristic_grad_numpy(as_complex(features), cotangent)
    assert np.any(np.abs(expected) == 1000.0)
    if n == 64:
        assert np.any(np.abs(expected) < 100.0)
    np.testing.assert_allclose(grad_a, expected, rtol=RTOL, atol=1e-4)
    assert grad_b.shape == b.shape and not np.any(grad_b) and not np.any(grad_c) and complex(grad_z) == 0


def test_reference_heuristic_grad_formula():
    """The NumPy heuristic used above, checked by hand on values where each branch of 1.8 applies."""
    g = np.array([[0.5 + 0.5j, 0.01 + 0.0j, 0.0 + 0.0j]], np.complex64)
    cotangent = np.array([[[1.0, 2.0], [1.0, 0.0], [1.0, 0.0]]], np.float32)
    square = (0.5 + 0.5j) ** 2  # = 0.5j, |S| >= 1e-3
    first = 0.5 * -((1 + 2j) * square).real + 0.5 * -((1 + 2j) / (square + 1e-6)).real
    small = 1e-4 / (1e-4 + 1e-9) * 1e-3  # |S| = 1e-4 raised to ~1e-3
    second = 0.5 * -1e-4 + 0.5 * -(1.0 / (small + 1e-6))
    expected = [first, max(second, -1000.0), -1000.0]  # G = 0: -0.5 / 1e-6, clamped
    np.testing.assert_allclose(reference_heuristic_grad_numpy(g, cotangent)[0], expected, rtol=1e-5)


def test_reference_host_implementation_is_the_numpy_reference():
    rng = np.random.default_rng(5)
    a = potential(rng, 2, 30)
    host = reference_mode_features_host(a, None, None, 1j)
    np.testing.assert_array_equal(host, reference_mode_forward_numpy(a))
    np.testing.assert_allclose(host, reference_mode_features(a, None, None, 1j), rtol=0, atol=1e-6)
    cotangent = rng.normal(size=(2, 30, 2)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(reference_mode_features_host(x, None, None, 1j) * cotangent)))(a)
    expected = reference_heuristic_grad_numpy(as_complex(reference_mode_forward_numpy(a)), cotangent)
    np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Native causal.
# ----------------------------------------------------------------------------------------------------------------

# One explicit inverse per prefix costs O(N^4): the longest case gets a single row.
@pytest.mark.parametrize("n, z", [(1, 1j), (2, 1j), (7, 1j), (64, 1j), (256, 1j),
                                  (1, 0.3 + 0.5j), (2, 0.3 + 0.5j), (7, 0.3 + 0.5j), (64, 0.3 + 0.5j)])
def test_causal_matches_dense_prefix_inverses(n, z):
    rng = np.random.default_rng(n)
    a = potential(rng, 1 if n > 64 else 2, n)
    b, c = off_diagonals(rng, n)
    z = np.complex64(z)
    exact = dense_causal_numpy(a, b, c, z)
    np.testing.assert_allclose(causal_numpy(a, b, c, z), exact, rtol=1e-12)  # the continued fraction oracle
    assert max_relative_error(causal_features(a, b, c, jnp.asarray(z)), exact) <= RTOL


def test_causal_matches_sequential_scan_and_its_gradient():
    rng = np.random.default_rng(11)
    a = potential(rng, 3, 300)
    b, c = off_diagonals(rng, 300)
    np.testing.assert_allclose(causal_features(a, b, c, 1j), causal_scan_reference(a, b, c, 1j), rtol=RTOL, atol=1e-6)
    loss = weighted_loss(rng.normal(size=(3, 300, 2)).astype(np.float32))
    grad = jax.jit(jax.grad(lambda x: loss(causal_features(x, b, c, 1j))))(a)
    grad_scan = jax.jit(jax.grad(lambda x: loss(causal_scan_reference(x, b, c, 1j))))(a)
    assert np.max(np.abs(grad)) > 0.1
    np.testing.assert_allclose(grad, grad_scan, rtol=RTOL, atol=1e-5)


def test_causal_gradient_matches_finite_differences():
    rng = np.random.default_rng(12)
    a = potential(rng, 2, 24)
    b, c = off_diagonals(rng, 24)
    weights = rng.normal(size=(2, 24, 2))
    loss = weighted_loss(weights.astype(np.float32))
    grad_fn = jax.jit(jax.grad(lambda x, z: loss(causal_features(x, b, c, z))))
    for z in (1j, complex(np.complex64(0.3 + 0.5j))):
        expected = finite_difference_gradient(causal_numpy, a, b, c, z, weights)
        assert np.max(np.abs(expected)) > 0.1
        np.testing.assert_allclose(grad_fn(a, z), expected, rtol=RTOL, atol=1e-5)


def test_causal_outputs_do_not_depend_on_later_inputs():
    rng = np.random.default_rng(13)
    a = potential(rng, 2, 200)
    changed = a.copy()
    t = 117
    changed[:, t] += 0.75
    before = np.asarray(causal_features(a, None, None, 1j))
    after = np.asarray(causal_features(changed, None, None, 1j))
    np.testing.assert_array_equal(before[:, :t], after[:, :t])  # bit-identical
    assert np.all(np.abs(before[:, t] - after[:, t]) > 1e-3)
    # And the exact gradient of an output at t has no component after t.
    grad = jax.jit(jax.grad(lambda x: causal_features(x, None, None, 1j)[:, t, 1].sum()))(a)
    assert not np.any(np.asarray(grad)[:, t + 1:]) and np.all(np.asarray(grad)[:, t] != 0)


@pytest.mark.parametrize(
    "name", ["growing", "large", "alternating_large", "near_singular"])
def test_causal_hard_potentials(name):
    n = 2048
    rng = np.random.default_rng(14)
    t = np.arange(n)
    if name == "growing":
        a = -2.0 + 3.0 * t / n
    elif name == "large":
        a = rng.uniform(-50, 50, n)
    elif name == "alternating_large":
        a = 50.0 * (-1.0) ** t
    else:
        # Choose a_t = Re(k g_{t-1}) so that d_t - k g_{t-1} has (almost) no real part.
        a = np.empty(n)
        previous = 0.0
        for i in range(n):
            a[i] = np.float32((previous.real if i else 0.0) + rng.normal(scale=1e-3))
            previous = 1.0 / (a[i] - 1j - previous) if i else 1.0 / (a[i] - 1j)
    a = np.asarray(a, np.float32)[None]
    exact = causal_numpy(a)
    assert max_relative_error(causal_features(a, None, None, 1j), exact) <= RTOL


def test_long_sequences_are_finite_and_accurate():
    n = 65_536
    rng = np.random.default_rng(15)
    a = potential(rng, 1, n)
    causal = np.asarray(causal_features(a, None, None, 1j))
    assert np.all(np.isfinite(causal)) and max_relative_error(causal, causal_numpy(a)) <= RTOL
    bidirectional = np.asarray(bidirectional_features(a, None, None, 1j))
    assert np.all(np.isfinite(bidirectional)) and max_relative_error(bidirectional, bidirectional_numpy(a)) <= RTOL
    weights = rng.normal(size=(1, n, 2)).astype(np.float32)
    loss = weighted_loss(weights)
    grad = jax.jit(jax.grad(lambda x: loss(causal_features(x, None, None, 1j))))(a)
    grad_scan = jax.jit(jax.grad(lambda x: loss(causal_scan_reference(x, None, None, 1j))))(a)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, grad_scan, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("function", [causal_features, bidirectional_features])
def test_native_off_diagonals_and_shift_get_zero_cotangents(function):
    rng = np.random.default_rng(16)
    a = potential(rng, 2, 9)
    b, c = off_diagonals(rng, 9)
    _, vjp = jax.vjp(function, a, b, c, jnp.complex64(0.2 + 1j))
    grad_a, grad_b, grad_c, grad_z = vjp(jnp.ones((2, 9, 2), jnp.float32))
    assert np.all(np.asarray(grad_a) != 0)
    assert grad_b.shape == b.shape and not np.any(grad_b) and not np.any(grad_c) and complex(grad_z) == 0


# ----------------------------------------------------------------------------------------------------------------
# Native bidirectional.
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("z", [1j, 0.3 + 0.5j])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 256])
def test_bidirectional_matches_dense_inverse(n, z):
    rng = np.random.default_rng(100 + n)
    a = potential(rng, 2, n)
    b, c = off_diagonals(rng, n)
    z = np.complex64(z)
    exact = dense_bidirectional_numpy(a, b, c, z)
    np.testing.assert_allclose(bidirectional_numpy(a, b, c, z), exact, rtol=1e-12)
    assert max_relative_error(bidirectional_features(a, b, c, jnp.asarray(z)), exact) <= RTOL


def test_bidirectional_matches_sequential_scan_and_its_gradient():
    rng = np.random.default_rng(21)
    a = potential(rng, 3, 300)
    b, c = off_diagonals(rng, 300)
    np.testing.assert_allclose(bidirectional_features(a, b, c, 1j), bidirectional_scan_reference(a, b, c, 1j),
                               rtol=RTOL, atol=1e-6)
    loss = weighted_loss(rng.normal(size=(3, 300, 2)).astype(np.float32))
    grad = jax.jit(jax.grad(lambda x: loss(bidirectional_features(x, b, c, 1j))))(a)
    grad_scan = jax.jit(jax.grad(lambda x: loss(bidirectional_scan_reference(x, b, c, 1j))))(a)
    assert np.max(np.abs(grad)) > 0.1
    np.testing.assert_allclose(grad, grad_scan, rtol=RTOL, atol=1e-5)


def test_bidirectional_gradient_matches_finite_differences():
    rng = np.random.default_rng(22)
    a = potential(rng, 2, 24)
    b, c = off_diagonals(rng, 24)
    weights = rng.normal(size=(2, 24, 2))
    loss = weighted_loss(weights.astype(np.float32))
    grad = jax.jit(jax.grad(lambda x: loss(bidirectional_features(x, b, c, 1j))))(a)
    expected = finite_difference_gradient(bidirectional_numpy, a, b, c, 1j, weights)
    # Non-causal: a_t influences outputs before t, so the gradient of every position is non-zero.
    assert np.all(np.abs(expected) > 0)
    np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Native numerics: the Pallas kernels (pallas.py).
# ----------------------------------------------------------------------------------------------------------------

# Forward: chunks of 4 lanes x 4 positions (N = 37: three chunks, the last partial); backward: chunks of 8.
# Forward chunks of 16 positions walked 2 per program: at N = 37 the second program of a row has one chunk past the end.
BK_CONFIG = BkScanConfig(chunk=8, vector=4, lanes=4, carry_rows=2, carry_vector=2, scan_lanes=4, scan_vector=4,
                         scan_chunks_per_program=2)
# 16 positions per lane: the lane products and states are renormalised inside a lane's block.
BK_WIDE = BkScanConfig(chunk=8, vector=4, lanes=4, carry_rows=2, carry_vector=2, scan_lanes=2, scan_vector=16)
BK_KERNELS_AND_ORACLES = [(causal_features_pallas, causal_numpy), (bidirectional_features_pallas, bidirectional_numpy)]


def bk_case(seed, batch=3, n=37, coupled=True):
    rng = np.random.default_rng(seed)
    a = (np.float32(-2.0) + rng.uniform(-3, 3, (batch, n))).astype(np.float32)
    if not coupled:
        return a, None, None
    b = rng.uniform(0.5, 1.5, n - 1).astype(np.float32)
    c = rng.uniform(0.5, 1.5, n - 1).astype(np.float32)
    return a, b, c


@pytest.mark.interpret
@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
@pytest.mark.parametrize("coupled", [False, True])
def test_bk_values_and_grads_match_references(direction, coupled):
    # N = 37 in chunks of 8 (5 chunks, the last partial), 3 rows: 15 lanes in programs of 4, carries 2 rows at a time.
    a, b, c = bk_case(11 + coupled, coupled=coupled)
    z = 0.25 + 1.0j
    kernel = causal_features_pallas if direction == "causal" else bidirectional_features_pallas
    scan = causal_scan_reference if direction == "causal" else bidirectional_scan_reference
    oracle = causal_numpy if direction == "causal" else bidirectional_numpy
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((*a.shape, 2)), jnp.float32)

    @jax.jit
    def run(a):
        out, vjp = jax.vjp(lambda x: kernel(x, b, c, z, config=BK_CONFIG, interpret=INTERPRET), a)
        ref, ref_vjp = jax.vjp(lambda x: scan(x, b, c, z), a)
        return out, vjp(weights)[0], ref_vjp(weights)[0]

    out, grad, ref_grad = run(jnp.asarray(a))
    assert out.shape == (*a.shape, 2) and out.dtype == jnp.float32
    assert elementwise_rel_err(out, oracle(a, b, c, z)) <= 1e-5
    assert rel_err(grad, ref_grad) <= 2e-5


@pytest.mark.interpret
def test_bk_long_sequence_accuracy_against_float64():
    # Random, growing and near-singular potentials (one row each) at z = i, and a band-edge row.
    n = 16384
    rng = np.random.default_rng(17)
    rows = [np.float32(-2.0) + rng.uniform(-3, 3, n),
            np.float32(-2.0) + np.linspace(0.0, 1000.0, n),
            np.full(n, -2.0) + rng.uniform(-1e-3, 1e-3, n),
            np.full(n, 2.0)]
    a = np.stack(rows).astype(np.float32)
    out = jax.jit(lambda a: causal_features_pallas(a, interpret=INTERPRET))(a)
    assert elementwise_rel_err(out, causal_numpy(a)) <= 1e-5
    out = jax.jit(lambda a: bidirectional_features_pallas(a, interpret=INTERPRET))(a)
    assert elementwise_rel_err(out, bidirectional_numpy(a)) <= 1e-5


@pytest.mark.interpret
@pytest.mark.parametrize("config", [BK_CONFIG, BK_WIDE], ids=["vector4", "vector16"])
def test_bk_single_step_and_huge_potentials(config):
    # N = 1 (one padded chunk) and |a| ~ 1e4, where the renormalisation bound of the config is reached: with 16
    # positions per lane, a product renormalised only once per block would overflow ((1e4)^16 > 3e38).
    a1 = np.array([[-1.5], [0.25]], np.float32)
    for kernel, oracle in BK_KERNELS_AND_ORACLES:
        out = kernel(a1, config=config, interpret=INTERPRET)
        assert elementwise_rel_err(out, oracle(a1)) <= 1e-6
        a = np.random.default_rng(5).uniform(-1e4, 1e4, (2, 41)).astype(np.float32)
        out = kernel(a, config=config, interpret=INTERPRET)
        assert np.all(np.isfinite(np.asarray(out)))
        assert elementwise_rel_err(out, oracle(a)) <= 1e-5


@pytest.mark.interpret
def test_bk_real_energy_with_a_padded_last_chunk():
    # z = 0 and N = 37 (the last forward chunk padded): the right sweep runs through the padding first, whose steps
    # must keep the state finite and non-zero for the first real step to discard it.
    a = (np.float32(-2.0) + np.random.default_rng(8).uniform(-3, 3, (2, 37))).astype(np.float32)
    for kernel, oracle in BK_KERNELS_AND_ORACLES:
        out = kernel(a, None, None, 0.0, config=BK_CONFIG, interpret=INTERPRET)
        assert np.all(np.isfinite(np.asarray(out)))
        assert rel_err(out, np.stack([oracle(a, None, None, 0.0).real, oracle(a, None, None, 0.0).imag], -1)) <= 1e-4


def _pallas_call_arities(closed_jaxpr):
    """Number of inputs of every pallas_call in a jaxpr, sub-jaxprs (jit, custom_vjp) included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append(len(eqn.invars))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(closed_jaxpr.jaxpr)
    return found


@pytest.mark.interpret
@pytest.mark.parametrize("n", [32, 37], ids=["full-chunks", "padded"])
def test_bk_python_and_array_z_agree(n):
    # A Python z is compiled into the kernels, an array z is read at run time: same values, same gradients. At
    # N = 32 every forward chunk is full (unit coupling then runs with k = 1 on every step and no masks); at N = 37
    # the last one is padded.
    a = jnp.asarray(bk_case(21, n=n, coupled=False)[0])
    z = 0.3 + 0.8j
    weights = jnp.asarray(np.random.default_rng(4).standard_normal((*a.shape, 2)), jnp.float32)
    for kernel, oracle in BK_KERNELS_AND_ORACLES:
        def loss(a, z, kernel=kernel):
            return jnp.sum(kernel(a, None, None, z, config=BK_CONFIG, interpret=INTERPRET) * weights)

        out = kernel(a, None, None, z, config=BK_CONFIG, interpret=INTERPRET)
        assert elementwise_rel_err(out, oracle(np.asarray(a), None, None, z)) <= 1e-5
        array_out = kernel(a, None, None, jnp.asarray(z, jnp.complex64), config=BK_CONFIG, interpret=INTERPRET)
        assert rel_err(out, array_out) <= 1e-6
        if n == 32:  # gradients once (the padded geometry's are covered with a Python z above)
            static_grad = jax.jit(jax.grad(lambda a: loss(a, z)))(a)
            array_grad = jax.jit(jax.grad(loss))(a, jnp.asarray(z, jnp.complex64))
            assert rel_err(static_grad, array_grad) <= 1e-6
        # The prefix and values kernels of the Python-z call take one input (z) fewer; the carry kernel has none.
        static_arities = _pallas_call_arities(jax.make_jaxpr(lambda a: kernel(a, z=z, config=BK_CONFIG,
                                                                               interpret=INTERPRET))(a))
        array_arities = _pallas_call_arities(jax.make_jaxpr(lambda a, z: kernel(a, z=z, config=BK_CONFIG,
                                                                                 interpret=INTERPRET))(a, z))
        assert len(static_arities) == len(array_arities) == 3
        assert sum(array_arities) - sum(static_arities) == 2
        for bad in (None, True):
            with pytest.raises(ValueError, match="z must be a complex scalar"):
                kernel(a, z=bad, config=BK_CONFIG, interpret=INTERPRET)


@pytest.mark.parametrize("field, value", [("scan_lanes", 48), ("scan_lanes", 1), ("scan_vector", 12),
                                          ("scan_chunks_per_program", 3),
                                          ("scan_warps", 3), ("chunk", 6), ("lanes", 0)])
def test_bk_config_rejects_bad_block_sizes(field, value):
    with pytest.raises(ValueError, match=f"BkScanConfig.{field}"):
        BkScanConfig(**{field: value})


def test_bk_config_defaults_follow_the_sequence_length():
    # The sweep winners of docs/perf/NOTES.md (v6): 32 lanes x 16 at N = 8192, 32 lanes x 32 at N = 65,536.
    config = BkScanConfig()
    assert (config.scan_lanes_for(8192), config.scan_vector_for(8192), config.scan_warps_for(8192)) == (32, 16, 1)
    assert (config.scan_lanes_for(65536), config.scan_vector_for(65536)) == (32, 32)
    assert config.scan_lanes_for(1 << 20) == 128 and config.scan_warps_for(1 << 20) == 4
    assert BkScanConfig(scan_lanes=256).scan_warps_for(100) == 8
    # One chunk per program unless asked (v7 sweep); more than a row has are clipped by the kernels' geometry.
    assert config.scan_chunks_per_program == 1


def test_bk_sfu_reciprocals_only_where_they_were_measured_faster(monkeypatch):
    # Compiled bidirectional values kernels take their reciprocals as one rcp.approx.ftz.f32 each (1 µs faster on
    # the H100); the one-sided kernels keep the division (0.7 µs faster there), and the interpreter divides.
    monkeypatch.setattr(_pallas_backend, "require", lambda *args, **kwargs: None)
    a = jax.ShapeDtypeStruct((3, 1000), jnp.float32)

    def sfu_ops(kernel, interpret):
        return str(jax.make_jaxpr(functools.partial(kernel, interpret=interpret))(a)).count("rcp.approx.ftz.f32")

    assert sfu_ops(bidirectional_features_pallas, False) > 0
    assert sfu_ops(causal_features_pallas, False) == 0
    assert sfu_ops(bidirectional_features_pallas, True) == 0


# ----------------------------------------------------------------------------------------------------------------
# Reference numerics: the torch-parity Pallas kernel (pallas_torch_parity.py) against the XLA path.
# ----------------------------------------------------------------------------------------------------------------

SMALL_CONFIG = BkScanConfig(chunk=8, vector=4, lanes=4, carry_rows=2, carry_vector=2)
# Stacked sweeps have 3B rows: bigger blocks keep the interpreter's program count (its cost) down.
FEATURES_CONFIG = BkScanConfig(chunk=16, vector=4, lanes=32, carry_rows=4, carry_vector=2)


def sweep_inputs(rng, rows, n, coupled, z=0.25 + 1j):
    d_re = (np.float32(-2.0) + rng.uniform(-3, 3, (rows, n)) - np.float32(z.real)).astype(np.float32)
    d_im = np.full((rows, n), -np.float32(z.imag), np.float32)
    coupling = rng.uniform(0.25, 2.25, (rows, n)) if coupled else np.ones((rows, n))
    coupling[:, 0] = 0.0
    return d_re, d_im, coupling.astype(np.float32)


def compare_prefix_states(got, want, tolerance):
    """Mantissas of both scans, brought to the XLA exponent, agree within `tolerance` (their scale is [0.5, 1))."""
    got, want = [np.asarray(x) for x in got], [np.asarray(x) for x in want]
    assert [x.dtype for x in got] == [np.float32] * 4 + [np.int32]
    assert all(x.shape == want[0].shape for x in got)
    exponent_gap = got[4].astype(np.int64) - want[4]
    # Same normalisation rule: equal exponents, except within rounding of a power of two.
    assert np.abs(exponent_gap).max() <= 1 and np.mean(exponent_gap == 0) > 0.99
    scale = np.exp2(exponent_gap.astype(np.float64))
    for got_plane, want_plane in zip(got[:4], want[:4]):
        assert np.abs(got_plane * scale - want_plane).max() <= tolerance
    largest = np.max([np.abs(x) for x in got[:4]], axis=0)
    assert largest.min() >= 0.5 and largest.max() < 1.0


def assert_same_features(got, want, rtol=1e-5):
    """Identical zero pattern (the cliff), values within rtol relative to each row's largest |G|."""
    got, want = as_complex(got), as_complex(want)
    np.testing.assert_array_equal(got == 0, want == 0)
    row_scale = np.maximum(np.abs(want).max(axis=-1, keepdims=True), 1e-30)
    assert np.max(np.abs(got - want) / row_scale) <= rtol


def constant_rows(values, n):
    return np.stack([np.full(n, np.float32(-2.0) + np.float32(v), np.float32) for v in values])


# -------------------------------------------------------------------------------------------------------- prefix states

@pytest.mark.interpret
@pytest.mark.parametrize("rows, n, coupled", [(3, 37, True), (5, 129, False), (1, 8, True), (3, 1, False)])
def test_torch_parity_prefix_states_match_the_xla_scan(rows, n, coupled):
    # N = 37: 5 chunks of 8 (the last partial), 15 lanes in programs of 4; N = 129: 17 chunks; N = 8 and N = 1:
    # a single (full, or mostly padding) chunk.
    d_re, d_im, coupling = sweep_inputs(np.random.default_rng(n + coupled), rows, n, coupled)
    got = mobius_prefix_scan_pallas(d_re, d_im, coupling, config=SMALL_CONFIG, interpret=INTERPRET)
    compare_prefix_states(got, jax.jit(xla._mobius_prefix_scan)(d_re, d_im, coupling), 2e-6)


@pytest.mark.interpret
def test_torch_parity_prefix_states_with_huge_entries_stay_finite():
    # |a - z| + |k| ~ 1e4, the bound of the renormalisation schedule, with vector = 16 (two renormalisations per
    # vector-block): no entry overflows float32, exponents grow ~13 per step.
    rng = np.random.default_rng(9)
    d_re = rng.uniform(-7e3, 7e3, (3, 75)).astype(np.float32)
    d_im = np.full_like(d_re, -1.0)
    coupling = rng.uniform(-3e3, 3e3, (3, 75)).astype(np.float32)
    coupling[:, 0] = 0.0
    config = BkScanConfig(chunk=16, vector=16, lanes=4, carry_rows=2, carry_vector=2)
    got = mobius_prefix_scan_pallas(d_re, d_im, coupling, config=config, interpret=INTERPRET)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in got)
    assert np.asarray(got[4]).max() > 75 * 10
    compare_prefix_states(got, jax.jit(xla._mobius_prefix_scan)(d_re, d_im, coupling), 2e-6)


@pytest.mark.interpret
def test_torch_parity_prefix_states_long_rows_with_the_default_config():
    # The moderately sized interpreted case: N = 4,096 in the default chunking (64 chunks of 64 steps), where the
    # sequential and the doubling scans round differently over many steps.
    d_re, d_im, coupling = sweep_inputs(np.random.default_rng(4), 2, 4096, True)
    got = mobius_prefix_scan_pallas(d_re, d_im, coupling, interpret=INTERPRET)
    compare_prefix_states(got, jax.jit(xla._mobius_prefix_scan)(d_re, d_im, coupling), 5e-5)


# ------------------------------------------------------------------------------------------------------------- features

@pytest.mark.interpret
def test_torch_parity_features_match_xla_below_the_cliff_with_nonuniform_bonds():
    rng = np.random.default_rng(21)
    a = (np.float32(-2.0) + rng.uniform(-3, 3, (3, 41))).astype(np.float32)
    b = rng.uniform(0.5, 1.5, (3, 40)).astype(np.float32)
    c = rng.uniform(0.5, 1.5, 40).astype(np.float32)
    for z in (1j, 0.5 + 0.25j):
        got = reference_mode_features_pallas(a, b, c, z, config=FEATURES_CONFIG, interpret=INTERPRET)
        assert got.shape == (3, 41, 2) and got.dtype == jnp.float32
        assert_same_features(got, xla.reference_mode_features(a, b, c, z))
        assert np.all(as_complex(got) != 0)


@pytest.mark.interpret
def test_torch_parity_single_site_and_two_sites():
    for a in (np.array([[-1.5], [0.25]], np.float32), np.array([[-1.5, 0.5]], np.float32)):
        got = reference_mode_features_pallas(a, config=FEATURES_CONFIG, interpret=INTERPRET)
        np.testing.assert_allclose(got, reference_mode_forward_numpy(a), rtol=1e-6, atol=0)


@pytest.mark.interpret
def test_torch_parity_overflow_cliff_straddled_by_constant_rows():
    # v = -3 is the first value whose rows are all zero at N = 446; v between -3.01 and -2.99 straddles the cliff.
    a = constant_rows(np.linspace(-3.01, -2.99, 6), 446)
    got = reference_mode_features_pallas(a, config=FEATURES_CONFIG, interpret=INTERPRET)
    want = xla.reference_mode_features(a)
    assert_same_features(got, want)
    zero_rows = np.all(np.asarray(got) == 0, axis=(1, 2))
    assert 0 < zero_rows.sum() < len(a)
    np.testing.assert_array_equal(zero_rows, np.all(reference_mode_forward_numpy(a) == 0, axis=(1, 2)))


@pytest.mark.interpret
def test_torch_parity_overflow_cliff_at_the_longest_table_length():
    """REFERENCE_SPEC 1.7: at N = 1338 constant rows are all zero for v <= 1 and v >= 3, and survive in between.

    The moderately sized interpreted case (default block sizes, 18 stacked rows of 1338: 21 chunks of 64)."""
    values = [0.999, 1.0, 1.001, 2.999, 3.0, 3.001]
    a = constant_rows(values, 1338)
    got = reference_mode_features_pallas(a, interpret=INTERPRET)
    assert_same_features(got, xla.reference_mode_features(a))
    zero_rows = np.all(np.asarray(got) == 0, axis=(1, 2))
    np.testing.assert_array_equal(zero_rows, [True, True, False, False, True, True])
    np.testing.assert_array_equal(zero_rows, np.all(reference_mode_forward_numpy(a) == 0, axis=(1, 2)))


# ------------------------------------------------------------------------------------------------------------- gradient

@pytest.mark.interpret
def test_torch_parity_heuristic_gradient_is_the_xla_paths_backward():
    # A random row below the cliff and a constant row beyond it (G = 0: the 1/G^2 term hits the clamp), with large
    # cotangents at some positions so that the +-1000 clamp binds there too.
    rng = np.random.default_rng(5)
    n = 446
    a = np.concatenate([(np.float32(-2.0) + rng.uniform(-3, 3, (1, n))).astype(np.float32), constant_rows([-3.0], n)])
    b = rng.uniform(0.5, 1.5, n - 1).astype(np.float32)
    large = np.where(rng.uniform(size=(2, n, 1)) < 0.3, 5000.0, 1.0)
    weights = jnp.asarray(rng.standard_normal((2, n, 2)) * large, jnp.float32)

    def features_and_grad(kernel, **options):
        features, vjp = jax.vjp(lambda x: kernel(x, b, b, 1j, **options), a)
        return features, vjp(weights)[0]

    got_features, got = jax.jit(lambda: features_and_grad(reference_mode_features_pallas, config=FEATURES_CONFIG,
                                                          interpret=INTERPRET))()
    want_features, want = jax.jit(lambda: features_and_grad(xla.reference_mode_features))()
    # The backward is the XLA path's function of (G, cotangent), applied to the kernel's G...
    g = jax.lax.complex(got_features[..., 0], got_features[..., 1])
    np.testing.assert_array_equal(got, jax.jit(reference_heuristic_grad)(g, weights))
    assert np.all(np.asarray(want)[1] != 0)
    # ...and the heuristic (1/G^2 terms) magnifies the ~1e-6 differences in G to ~1e-3 here, no more.
    assert_same_features(got_features, want_features)
    np.testing.assert_allclose(got, want, rtol=3e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# GPU only: compiled kernels.
# ----------------------------------------------------------------------------------------------------------------

def _bk_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = [np.float32(-2.0) + rng.uniform(-3, 3, n),                 # the model's range of potentials
            np.float32(-2.0) + np.linspace(0.0, 1000.0, n),           # growing
            np.full(n, -2.0) + rng.uniform(-1e-3, 1e-3, n),           # near-singular (flat band centre)
            np.full(n, 2.0)]                                          # band edge
    return np.stack(rows).astype(np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
def test_bk_full_length_against_float64(direction):
    a = _bk_rows(65536, 3)
    b = np.random.default_rng(4).uniform(0.5, 1.5, 65535).astype(np.float32)
    kernel = causal_features_pallas if direction == "causal" else bidirectional_features_pallas
    oracle = causal_numpy if direction == "causal" else bidirectional_numpy
    for bb, z in [(None, 1j), (b, 0.3 + 1j)]:
        out = kernel(a, bb, bb, z)
        assert np.all(np.isfinite(np.asarray(out)))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(kernel(a, bb, bb, z)))
        assert elementwise_rel_err(out, oracle(a, bb, bb, z)) <= 1e-5


@pytest.mark.gpu
def test_bk_grads_against_sequential_scan():
    a = jnp.asarray(_bk_rows(8192, 5))
    w = jnp.asarray(np.random.default_rng(6).standard_normal((*a.shape, 2)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(jax.grad(lambda x, w: jnp.sum(w * causal_features_pallas(x))))(a, w)
        want = jax.jit(jax.grad(lambda x, w: jnp.sum(w * causal_scan_reference(x))))(a, w)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.gpu
def test_bk_default_is_pallas_for_native_numerics_on_gpu():
    assert resolve("native") is causal_features_pallas
    assert resolve("native", "bidirectional") is bidirectional_features_pallas


@pytest.mark.gpu
def test_gpu_default_for_reference_numerics_is_the_kernel():
    assert resolve("reference") is reference_mode_features_pallas
    assert resolve("reference", implementation="pallas") is reference_mode_features_pallas


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1000, 65536])
def test_gpu_prefix_states_match_the_xla_scan(n):
    rng = np.random.default_rng(n)
    d_re, d_im, coupling = sweep_inputs(rng, 3, n, True)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(xla._mobius_prefix_scan)(d_re, d_im, coupling)
    # Both scans drift from float64 by ~1e-4 of the mantissa scale at N = 65,536 (differently rounded), ~1e-6 at 1e3.
    compare_prefix_states(mobius_prefix_scan_pallas(d_re, d_im, coupling), want, 1e-5 if n <= 1000 else 5e-4)


@pytest.mark.gpu
def test_gpu_features_and_cliff_match_the_xla_path():
    # Rows: random potentials (zero beyond N ~ 1000), constant rows straddling the v = -3 cliff, and weakly coupled
    # rows (b = c = 0.1) whose determinants grow slowly enough to stay below 2**1024 for longer.
    rng = np.random.default_rng(12)
    for n in (446, 2048, 65536):
        a = np.concatenate([(np.float32(-2.0) + rng.uniform(-3, 3, (2, n))).astype(np.float32),
                            constant_rows([-3.005, -2.995], n),
                            rng.uniform(-0.1, 0.1, (2, n)).astype(np.float32)])
        for b in (None, np.full(n - 1, 0.1, np.float32)):
            got = bk_features(a, b, b, 1j, numerics="reference", implementation="pallas")
            assert_same_features(got, xla.reference_mode_features(a, b, b, 1j), rtol=1e-4)
            np.testing.assert_array_equal(got, reference_mode_features_pallas(a, b, b, 1j))


@pytest.mark.gpu
def test_gpu_weak_coupling_straddles_the_cliff_at_long_lengths():
    # With b = c = 0.1 and a ~ 0 the determinant grows by ~|d| = 1 per step: rows cross 2**1024 at long lengths.
    n = 65536
    # Final exponents ~932, 982, 1130, ... (XLA path): the first two rows survive, the others are all zero.
    scales = np.linspace(0.0, 0.4, 8, dtype=np.float32)
    a = (scales[:, None] * np.random.default_rng(3).uniform(-1, 1, (1, n))).astype(np.float32)
    b = np.full(n - 1, 0.1, np.float32)
    got = reference_mode_features_pallas(a, b, b, 1j)
    assert_same_features(got, xla.reference_mode_features(a, b, b, 1j), rtol=1e-4)
    zero_rows = np.all(np.asarray(got) == 0, axis=(1, 2))
    assert 0 < zero_rows.sum() < len(a)


# ----------------------------------------------------------------------------------------------------------------
# Dispatcher and input checks.
# ----------------------------------------------------------------------------------------------------------------

def test_dispatcher_routes_to_each_implementation():
    # The default is backend-dependent: the sequential scan on CPU, the Pallas kernels on a CUDA GPU that runs them
    # (the `gpu` tests check those), the parallel XLA form on other accelerators.
    on_cpu = jax.default_backend() == "cpu"
    kernels = _pallas_backend.available()
    if not kernels:
        assert resolve("native") is (causal_scan_reference if on_cpu else causal_features)
    assert resolve("native", "causal", "scan") is causal_scan_reference
    assert resolve("native", "bidirectional", "scan") is bidirectional_scan_reference
    assert resolve("native", implementation="xla") is causal_features
    assert resolve("native", "bidirectional", "xla") is bidirectional_features
    assert resolve("native", "causal", "reference") is causal_scan_reference
    assert resolve("native", "bidirectional", "reference") is bidirectional_scan_reference
    # Reference numerics have their own full-matrix semantics: direction is ignored.
    for direction in ("causal", "bidirectional"):
        if not kernels:
            assert resolve("reference", direction) is reference_mode_features
        assert resolve("reference", direction, "xla") is reference_mode_features
        assert resolve("reference", direction, "reference") is reference_mode_features_host


def test_dispatcher_end_to_end():
    rng = np.random.default_rng(31)
    a = potential(rng, 2, 33)
    b, c = off_diagonals(rng, 33)
    z = jnp.complex64(1j)
    causal = np.asarray(bk_features(a, b, c, z, numerics="native", implementation="xla"))
    np.testing.assert_array_equal(causal, causal_features(a, b, c, z))
    default = np.asarray(bk_features(a, b, c, z, numerics="native"))
    assert max_relative_error(default, dense_causal_numpy(a, b, c, 1j)) <= RTOL
    assert max_relative_error(causal, dense_causal_numpy(a, b, c, 1j)) <= RTOL
    bidirectional = np.asarray(bk_features(a, b, c, z, numerics="native", direction="bidirectional"))
    assert max_relative_error(bidirectional, dense_bidirectional_numpy(a, b, c, 1j)) <= RTOL
    np.testing.assert_array_equal(bk_features(a, b, c, z, numerics="reference", implementation="reference"),
                                  reference_mode_forward_numpy(a, b, c, 1j))


@pytest.mark.parametrize("argument, value", [("numerics", "exact"), ("direction", "anticausal"),
                                              ("implementation", "triton")])
def test_dispatcher_rejects_unknown_names(argument, value):
    kwargs = {"numerics": "native", argument: value}
    with pytest.raises(ValueError, match=argument) as error:
        bk_features(np.zeros((1, 4), np.float32), None, None, 1j, **kwargs)
    assert repr(value) in str(error.value)
    assert {"numerics": "'native'", "direction": "'bidirectional'", "implementation": "'xla'"}[argument] in str(
        error.value)


def test_dispatcher_pallas_is_not_available_without_a_gpu(pallas_unavailable):
    a = np.zeros((1, 4), np.float32)
    assert available_implementations() == ("xla", "scan", "reference")
    for numerics in ("native", "reference"):
        with pytest.raises(_pallas_backend.PallasUnavailableError, match="pallas") as error:
            bk_features(a, None, None, 1j, numerics=numerics, implementation="pallas")
        assert "'xla'" in str(error.value) and "'reference'" in str(error.value)
        assert single_line_naming(str(error.value), "xla", "scan", "reference")
    for kernel in (causal_features_pallas, bidirectional_features_pallas, reference_mode_features_pallas):
        with pytest.raises(_pallas_backend.PallasUnavailableError, match="interpret=True"):
            kernel(a)


def test_implementation_names():
    assert IMPLEMENTATIONS == (None, "xla", "scan", "reference", "pallas")
    assert available_implementations() == (("xla", "scan", "reference", "pallas") if KERNELS_RUN_HERE
                                            else ("xla", "scan", "reference"))


def test_default_falls_back_once_where_the_kernels_cannot_run(gpu_backend, pallas_unavailable):
    with pytest.warns(RuntimeWarning, match="bk_scan.*falls back from 'pallas' to 'xla'") as caught:
        assert resolve("native") is causal_features
    assert [w.filename for w in caught] == [__file__]  # attributed to the caller of resolve
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert resolve("native", "bidirectional") is bidirectional_features
        assert resolve("reference") is reference_mode_features


def test_input_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        causal_features(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="b must have shape"):
        causal_features(np.zeros((2, 4), np.float32), np.ones(4, np.float32), None, 1j)
    # Per-row off-diagonals (B, N-1) are accepted and equal the broadcast ones.
    rng = np.random.default_rng(41)
    a = potential(rng, 2, 5)
    b, c = off_diagonals(rng, 5)
    np.testing.assert_array_equal(causal_features(a, np.stack([b, b]), c, 1j), causal_features(a, b, c, 1j))


@pytest.mark.skipif(ON_GPU, reason="lowers for CUDA from a machine without a GPU")
def test_native_kernels_lower_to_triton_for_cuda(monkeypatch):
    # Catches Pallas -> Triton lowering errors (unsupported primitives, shapes) in CI without a GPU. jaxlib 0.10
    # embeds the Triton IR without compiling it; PTX compilation happens on the GPU (the `gpu` tests).
    monkeypatch.setattr(_pallas_backend, "require", lambda *args, **kwargs: None)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731

    def loss_bk(a, b):
        return jnp.sum(causal_features_pallas(a, b, b)) + jnp.sum(bidirectional_features_pallas(a))

    # Causal: 3 forward + 3 backward kernels; bidirectional: its fused forward is dead code under grad, the backward
    # recomputes both sides (3 + 3) and runs their backward (3 + 3).
    for fn, args, kernels in [(jax.grad(loss_bk), (f32(3, 1000), f32(999)), 18),
                              (bidirectional_features_pallas, (f32(3, 1000),), 3)]:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("triton") >= kernels


@pytest.mark.skipif(ON_GPU, reason="lowers for CUDA from a machine without a GPU")
def test_torch_parity_kernels_lower_to_triton_for_cuda(monkeypatch):
    # As for the native kernels: catches Pallas -> Triton lowering errors without a GPU (the IR is embedded, not
    # compiled: PTX compilation happens on the GPU, in the `gpu` tests).
    monkeypatch.setattr(_pallas_backend, "require", lambda *args, **kwargs: None)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)

    def loss(a, b):
        return jnp.sum(reference_mode_features_pallas(a, b, b) ** 2)

    text = jax.jit(jax.grad(loss)).trace(f32(3, 1000), f32(999)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 3
    for name in ("bk_reference_maps", "bk_reference_carry", "bk_reference_values"):
        assert name in text
