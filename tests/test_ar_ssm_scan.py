"""AR-SSM scan op: xla vs reference (values, gradients), bf16 error bound, long-sequence accuracy, dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phase1_jax.kernels.ar_ssm_scan import (ar_ssm_scan, ar_ssm_scan_reference, ar_ssm_scan_xla,
                                            chunked_cumsum)


def _inputs(shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(shape)
    v = rng.standard_normal(shape)
    g = rng.uniform(0.0, 1.0, shape)
    return tuple(jnp.asarray(a, dtype) for a in (u, v, g))


def _numpy_exact(u, v, g, reverse=False):
    u, v, g = (np.asarray(a, np.float64) for a in (u, v, g))
    a = u * g
    k = np.cumsum(a[:, ::-1], axis=1)[:, ::-1] if reverse else np.cumsum(a, axis=1)
    return k * (v * g)


def _rel_err(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)


# 1031 = 4 full chunks of 256 + an odd tail; 37 with chunk 8 exercises many small chunks.
@pytest.mark.parametrize("length,chunk,reverse", [(1, 256, False), (7, 256, True), (37, 8, False), (37, 8, True),
                                                  (1031, 256, False), (1031, 256, True)])
def test_xla_matches_reference_values_and_grads(length, chunk, reverse):
    u, v, g = _inputs((2, length, 5), seed=length)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal((2, length, 5)), jnp.float32)
    ref_fn = lambda *a: ar_ssm_scan_reference(*a, reverse=reverse)  # noqa: E731
    xla_fn = lambda *a: ar_ssm_scan_xla(*a, reverse=reverse, chunk_size=chunk)  # noqa: E731

    @jax.jit  # one compilation per case keeps the suite fast
    def run(u, v, g):
        grads = [jax.grad(lambda *a: jnp.sum(cot * fn(*a)), (0, 1, 2))(u, v, g) for fn in (ref_fn, xla_fn)]
        return ref_fn(u, v, g), xla_fn(u, v, g), grads

    ref, out, (ref_grads, xla_grads) = run(u, v, g)
    assert out.shape == u.shape and out.dtype == jnp.float32
    assert _rel_err(out, ref) <= 2e-5
    assert _rel_err(ref, _numpy_exact(u, v, g, reverse)) <= 2e-5  # the reference is what it claims to be
    for got, want in zip(xla_grads, ref_grads):
        assert _rel_err(got, want) <= 2e-5


def test_chunk_boundaries_are_exact_against_numpy():
    # Many chunks, an odd tail, reverse and forward.
    a = jnp.asarray(np.random.default_rng(3).standard_normal((3, 101, 2)), jnp.float32)
    for reverse in (False, True):
        want = np.cumsum(np.asarray(a, np.float64)[:, ::-1], 1)[:, ::-1] if reverse else np.cumsum(a, 1)
        got = jax.jit(lambda a: chunked_cumsum(a, reverse=reverse, chunk_size=4))(a)
        assert _rel_err(got, want) <= 1e-6


def test_causal_and_reverse_dependence():
    u, v, g = _inputs((1, 600, 3))
    fwd = jax.jit(lambda u: ar_ssm_scan(u, v, g))
    rev = jax.jit(lambda u: ar_ssm_scan(u, v, g, reverse=True))
    base, base_rev = fwd(u), rev(u)
    t = 300
    u2 = u.at[:, t].add(1.0)
    out, out_rev = fwd(u2), rev(u2)
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert np.all(np.asarray(out[:, t:] != base[:, t:]).any(axis=-1))
    np.testing.assert_array_equal(out_rev[:, t + 1:], base_rev[:, t + 1:])
    assert np.all(np.asarray(out_rev[:, :t + 1] != base_rev[:, :t + 1]).any(axis=-1))


def test_bf16_error_bound_values_and_grads():
    u, v, g = _inputs((2, 600, 8), jnp.bfloat16, seed=5)
    cot = jnp.asarray(np.random.default_rng(6).standard_normal(u.shape), jnp.bfloat16)

    @jax.jit
    def run(u, v, g):
        f32 = [a.astype(jnp.float32) for a in (u, v, g)]
        exact = jax.grad(lambda *a: jnp.sum(cot.astype(jnp.float32) * ar_ssm_scan_reference(*a)), (0, 1, 2))(*f32)
        grads = [jax.grad(lambda *a: jnp.sum((cot * fn(*a)).astype(jnp.float32)), (0, 1, 2))(u, v, g)
                 for fn in (ar_ssm_scan_reference, ar_ssm_scan_xla)]
        return ar_ssm_scan_reference(u, v, g), ar_ssm_scan_xla(u, v, g), exact, grads

    ref, out, exact_grads, (ref_grads, xla_grads) = run(u, v, g)
    exact = _numpy_exact(u, v, g)
    assert out.dtype == jnp.bfloat16
    ref_err = np.abs(np.asarray(ref, np.float64) - exact).max()
    xla_err = np.abs(np.asarray(out, np.float64) - exact).max()
    assert xla_err <= 1.5 * ref_err + 1e-6
    # Stronger: with float32 accumulation the only bf16 error left is the final rounding (unit roundoff 2^-8).
    out64 = np.asarray(out, np.float64)
    assert np.all(np.abs(out64 - exact) <= 2.0 ** -8 * np.abs(exact) + 1e-5 * np.abs(exact).max())
    assert all(x.dtype == jnp.bfloat16 for x in xla_grads)
    for got, ref_g, want in zip(xla_grads, ref_grads, exact_grads):
        want = np.asarray(want, np.float64)
        got_err = np.abs(np.asarray(got, np.float64) - want).max()
        ref_err = np.abs(np.asarray(ref_g, np.float64) - want).max()
        assert got_err <= 1.5 * ref_err + 1e-6


def test_long_sequence_float32_accuracy():
    length = 65_536
    rng = np.random.default_rng(7)
    # A drifting prefix sum (positive mean) is the hard case for float32 accumulation.
    u = jnp.asarray(rng.standard_normal((1, length, 4)) + 0.5, jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, length, 4)), jnp.float32)
    g = jnp.asarray(rng.uniform(0, 1, (1, length, 4)), jnp.float32)
    for reverse in (False, True):
        out = jax.jit(lambda u, v, g: ar_ssm_scan(u, v, g, reverse=reverse))(u, v, g)
        assert _rel_err(out, _numpy_exact(u, v, g, reverse)) <= 1e-5


def test_dispatch():
    u, v, g = _inputs((1, 9, 2))
    np.testing.assert_array_equal(ar_ssm_scan(u, v, g), ar_ssm_scan_xla(u, v, g))
    np.testing.assert_array_equal(ar_ssm_scan(u, v, g, implementation="reference"),
                                  ar_ssm_scan_reference(u, v, g))
    with pytest.raises(NotImplementedError, match="pallas.*not available"):
        ar_ssm_scan(u, v, g, implementation="pallas")
    with pytest.raises(ValueError, match="implementation.*'triton'.*'xla'"):
        ar_ssm_scan(u, v, g, implementation="triton")
    with pytest.raises(ValueError, match="one shape"):
        ar_ssm_scan(u, v[:, :5], g)
    with pytest.raises(ValueError, match="chunk_size"):
        ar_ssm_scan(u, v, g, chunk_size=0)
