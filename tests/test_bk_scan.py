"""BK-Core kernels (kernels/bk_scan): reference mode against the complex128 NumPy reference (overflow cliff and
heuristic gradient included), native causal / bidirectional modes against dense inverses, sequential scans and
finite differences, and the dispatcher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phase1_jax.kernels import _pallas_backend
from phase1_jax.kernels.bk_scan import (
    bidirectional_features,
    bidirectional_numpy,
    bidirectional_scan_reference,
    bk_features,
    causal_features,
    causal_numpy,
    causal_scan_reference,
    dense_bidirectional_numpy,
    dense_causal_numpy,
    reference_heuristic_grad_numpy,
    reference_mode_features,
    reference_mode_features_host,
    reference_mode_forward_numpy,
    resolve,
)

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
# Reference mode.
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
# Dispatcher and input checks.
# ----------------------------------------------------------------------------------------------------------------

def test_dispatcher_routes_to_each_implementation():
    # The default is backend-dependent: the sequential scan on CPU, the Pallas kernels on a CUDA GPU that runs them
    # (tests/test_kernels_gpu.py checks those), the parallel XLA form on other accelerators.
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


@pytest.mark.skipif(_pallas_backend.available(), reason="the kernels run here")
def test_dispatcher_pallas_is_not_available_without_a_gpu():
    with pytest.raises(NotImplementedError, match="pallas") as error:
        bk_features(np.zeros((1, 4), np.float32), None, None, 1j, numerics="native", implementation="pallas")
    assert "'xla'" in str(error.value) and "'reference'" in str(error.value)


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
