"""GPU-only checks of the Pallas kernels (skipped without a CUDA GPU): compiled kernels at full lengths against
float64 references, every output written, run-to-run determinism, and the GPU defaults of the dispatchers.

tests/test_pallas_kernels.py holds the value/gradient tests; on a GPU it runs them compiled as well.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import elementwise_rel_err, rel_err
from phase1_jax.kernels import _pallas_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings(f"ignore:{_pallas_backend.TRITON_DEPRECATION}:DeprecationWarning"),
]

from phase1_jax.kernels.ar_ssm_scan import ar_ssm_scan, ar_ssm_scan_xla  # noqa: E402
from phase1_jax.kernels.ar_ssm_scan.pallas import ar_ssm_scan_pallas  # noqa: E402
from phase1_jax.kernels.bk_scan import (bidirectional_numpy, causal_numpy, causal_scan_reference,  # noqa: E402
                                        resolve)
from phase1_jax.kernels.bk_scan.pallas import (bidirectional_features_pallas,  # noqa: E402
                                               causal_features_pallas)
from phase1_jax.kernels.lns_matmul import lns_matmul, to_lns  # noqa: E402




def test_backend_reports_the_gpu():
    ok, what = _pallas_backend.gpu_status()
    assert ok, what


@pytest.mark.parametrize("reverse", [False, True])
def test_ar_ssm_full_length_against_float64_and_xla_grads(reverse):
    rng = np.random.default_rng(1)
    shape = (2, 65536, 32)
    u = jnp.asarray(rng.standard_normal(shape) + 0.5, jnp.float32)
    v = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    g = jnp.asarray(rng.uniform(0, 1, shape), jnp.float32)
    ct = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    a = np.asarray(u, np.float64) * np.asarray(g, np.float64)
    k = np.cumsum(a[:, ::-1], 1)[:, ::-1] if reverse else np.cumsum(a, 1)
    exact = k * np.asarray(v, np.float64) * np.asarray(g, np.float64)

    def grads(fn):
        # Arrays as arguments: closed-over arrays would become HLO constants (slow to compile at this size).
        def run(u, v, g, ct):
            out, vjp = jax.vjp(lambda *x: fn(*x, reverse=reverse), u, v, g)
            return out, vjp(ct)
        return jax.jit(run)(u, v, g, ct)

    out, got = grads(ar_ssm_scan_pallas)
    again, _ = grads(ar_ssm_scan_pallas)
    _, want = grads(ar_ssm_scan_xla)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))  # no race: bit-identical reruns
    assert rel_err(out, exact) <= 1e-6
    for x, y in zip(got, want):
        assert rel_err(x, y) <= 1e-5


def test_ar_ssm_default_is_pallas_on_gpu():
    rng = np.random.default_rng(2)
    u, v, g = (jnp.asarray(rng.standard_normal((2, 1000, 16)), jnp.float32) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning for supported inputs
        default = ar_ssm_scan(u, v, g)
    np.testing.assert_array_equal(np.asarray(default), np.asarray(ar_ssm_scan_pallas(u, v, g)))


def _bk_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = [np.float32(-2.0) + rng.uniform(-3, 3, n),                 # the model's range of potentials
            np.float32(-2.0) + np.linspace(0.0, 1000.0, n),           # growing
            np.full(n, -2.0) + rng.uniform(-1e-3, 1e-3, n),           # near-singular (flat band centre)
            np.full(n, 2.0)]                                          # band edge
    return np.stack(rows).astype(np.float32)


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


def test_bk_grads_against_sequential_scan():
    a = jnp.asarray(_bk_rows(8192, 5))
    w = jnp.asarray(np.random.default_rng(6).standard_normal((*a.shape, 2)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(jax.grad(lambda x, w: jnp.sum(w * causal_features_pallas(x))))(a, w)
        want = jax.jit(jax.grad(lambda x, w: jnp.sum(w * causal_scan_reference(x))))(a, w)
    assert rel_err(got, want) <= 1e-5


def test_bk_default_is_pallas_for_native_numerics_on_gpu():
    assert resolve("native") is causal_features_pallas
    assert resolve("native", "bidirectional") is bidirectional_features_pallas


def test_lns_exact_on_gpu_is_the_matmul():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((300, 200)).astype(np.float32)
    b = rng.standard_normal((200, 100)).astype(np.float32)
    out = lns_matmul(*to_lns(a), *to_lns(b), algorithm="exact")  # the GPU default: the kernel
    assert rel_err(out, np.asarray(a, np.float64) @ np.asarray(b, np.float64)) <= 1e-5
