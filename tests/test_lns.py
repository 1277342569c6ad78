"""LNS matmul kernels (reference and XLA) against their definitions, and LNSLinear."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import phase1_jax.models.lns as lns_module
from phase1_jax.errors import InvalidConfigError
from phase1_jax.kernels.lns_matmul import lns_matmul, to_lns
from phase1_jax.models.lns import LNSLinear

# (implementation, block_k): block sizes that split K unevenly exercise the padding and the cross-block merge.
IMPLS = [("reference", None), ("xla", None), ("xla", 3)]


def lns_inputs(a, b):
    """float32 (log|x|, sign x) computed in numpy (log 0 = -inf)."""
    with np.errstate(divide="ignore"):
        return (np.log(np.abs(a)).astype(np.float32), np.sign(a).astype(np.float32),
                np.log(np.abs(b)).astype(np.float32), np.sign(b).astype(np.float32))


def max_log_by_loops(la, sa, lb, sb):
    """The definition, literally: for each (m, n) the first k with the largest float32 log term."""
    M, K = la.shape
    N = lb.shape[1]
    out = np.zeros((M, N), np.float32)
    for m in range(M):
        for n in range(N):
            best, k_best = -np.inf, 0
            for k in range(K):
                t = np.float32(la[m, k]) + np.float32(lb[k, n])
                if t > best:  # strict: the first maximum wins ties
                    best, k_best = t, k
            out[m, n] = sa[m, k_best] * sb[k_best, n] * np.exp(np.float64(best))
    return out


def random_operands(M, K, N, seed, zeros=0.15):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(M, K)).astype(np.float32)
    b = rng.normal(size=(K, N)).astype(np.float32)
    a[rng.random(a.shape) < zeros] = 0.0
    b[rng.random(b.shape) < zeros] = 0.0
    return a, b


def tie_operands():
    """Exact ties between terms of opposite sign: the smallest k must win, within and across K blocks."""
    a = np.array([[2.0, -4.0, 0.0, 1.0, 0.5],
                  [-0.5, 0.5, 3.0, 0.0, -3.0],
                  [0.0, 0.0, 0.0, 0.0, 0.0],  # an all-zero row
                  [0.0, 0.0, 0.0, -4.0, 4.0]], np.float32)
    b = np.array([[4.0, -1.0, 0.25],
                  [2.0, 1.0, 0.0],
                  [0.0, -2.0, 1.0],
                  [1.0, 6.0, 2.0],
                  [1.0, 1.0, -1.0 / 3.0]], np.float32)
    # (0, 0): terms +8 (k=0), -8 (k=1), 0, 1, 0.5 -> +8: log 2 + log 4 and log 4 + log 2 tie exactly
    # (1, 2): terms -0.125, 0, 3, 0, 1 -> +3
    # (3, 0): terms 0, 0, 0, -4 (k=3), +4 (k=4) -> -4; k=3 and k=4 sit in different blocks for block_k 1 and 2
    return a, b


@pytest.mark.parametrize("impl, block_k", [("reference", None), ("xla", None), ("xla", 1), ("xla", 2)])
def test_max_log_tie_rule_smallest_k(impl, block_k):
    a, b = tie_operands()
    la, sa, lb, sb = lns_inputs(a, b)
    out = np.asarray(lns_matmul(la, sa, lb, sb, algorithm="max_log", implementation=impl, block_k=block_k))
    np.testing.assert_allclose(out, max_log_by_loops(la, sa, lb, sb), rtol=2e-6, atol=0)
    assert out[0, 0] == pytest.approx(8.0, rel=1e-6)
    assert out[1, 2] == pytest.approx(3.0, rel=1e-6)
    assert out[3, 0] == pytest.approx(-4.0, rel=1e-6)
    assert np.all(out[2] == 0)  # only zero products


@pytest.mark.parametrize("impl, block_k", IMPLS)
@pytest.mark.parametrize("shape", [(3, 7, 5), (9, 13, 2)])
def test_max_log_matches_definition(impl, block_k, shape):
    a, b = random_operands(*shape, seed=sum(shape))
    a[0] *= -3.0  # a row of large negative-leaning values
    la, sa, lb, sb = lns_inputs(a, b)
    expected = max_log_by_loops(la, sa, lb, sb)
    out = np.asarray(lns_matmul(la, sa, lb, sb, algorithm="max_log", implementation=impl, block_k=block_k))
    assert out.dtype == np.float32 and out.shape == (shape[0], shape[2])
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=0)
    assert np.array_equal(np.sign(out), np.sign(expected))


@pytest.mark.parametrize("impl, block_k", IMPLS)
@pytest.mark.parametrize("shape", [(3, 7, 5), (17, 33, 9)])
def test_exact_matches_matmul(impl, block_k, shape):
    a, b = random_operands(*shape, seed=7 + sum(shape))
    truth = a.astype(np.float64) @ b.astype(np.float64)
    out = np.asarray(lns_matmul(*lns_inputs(a, b), algorithm="exact", implementation=impl, block_k=block_k))
    assert out.dtype == np.float32 and out.shape == truth.shape
    f32 = np.asarray(jnp.matmul(a, b, precision="highest"))
    scale = max(np.abs(truth).max(), 1e-30)
    assert np.abs(out - f32).max() <= 1e-5 * scale
    assert np.abs(out - truth).max() <= 1e-5 * scale


@pytest.mark.parametrize("algorithm", ["max_log", "exact"])
def test_one_by_one(algorithm):
    for a, b in ((2.0, -3.0), (0.0, 5.0), (-0.5, -4.0)):
        out = lns_matmul(*lns_inputs(np.array([[a]], np.float32), np.array([[b]], np.float32)), algorithm=algorithm)
        assert float(out[0, 0]) == pytest.approx(a * b, rel=1e-6)


def test_exact_all_zero_and_cancellation():
    a = np.array([[0.0, 0.0], [1.0, 1.0], [3.0, -3.0]], np.float32)
    b = np.array([[2.0, 0.0], [-2.0, 0.0]], np.float32)
    for impl in ("reference", "xla"):
        out = np.asarray(lns_matmul(*lns_inputs(a, b), algorithm="exact", implementation=impl, block_k=1))
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, a @ b, atol=1e-6)


def test_error_report_each_algorithm():
    a, b = random_operands(32, 64, 24, seed=3, zeros=0.0)
    truth = a.astype(np.float64) @ b.astype(np.float64)
    errors = {}
    for algorithm in ("max_log", "exact"):
        out = np.asarray(lns_matmul(*lns_inputs(a, b), algorithm=algorithm), np.float64)
        errors[algorithm] = np.linalg.norm(out - truth) / np.linalg.norm(truth)
        print(f"LNS {algorithm:8s} relative Frobenius error vs exact matmul (32x64 @ 64x24, N(0,1)): "
              f"{errors[algorithm]:.3e}")
    assert errors["exact"] < 1e-6
    assert errors["max_log"] > 0.1  # the dominant-term approximation is coarse on random data


def test_jit_and_to_lns():
    a, b = random_operands(4, 6, 3, seed=1)
    la, sa = to_lns(a)
    assert np.isneginf(np.asarray(la)[a == 0]).all() and np.all(np.asarray(sa)[a == 0] == 0)
    f = jax.jit(lambda a, b: lns_matmul(*to_lns(a), *to_lns(b), algorithm="exact"))
    np.testing.assert_allclose(np.asarray(f(a, b)), a @ b, rtol=1e-5, atol=1e-6)


def test_dispatcher_errors():
    la, sa, lb, sb = lns_inputs(*random_operands(2, 3, 4, seed=0))
    with pytest.raises(ValueError, match="algorithm.*max_log.*exact"):
        lns_matmul(la, sa, lb, sb, algorithm="maxlog")
    with pytest.raises(ValueError, match="implementation.*xla"):
        lns_matmul(la, sa, lb, sb, implementation="triton")
    with pytest.raises(NotImplementedError, match="pallas.*not available"):
        lns_matmul(la, sa, lb, sb, implementation="pallas")
    with pytest.raises(ValueError, match="block_k"):
        lns_matmul(la, sa, lb, sb, block_k=0)
    with pytest.raises(ValueError, match="inner dimensions"):
        lns_matmul(la, sa, lb[:2], sb[:2])
    with pytest.raises(ValueError, match="sign"):
        lns_matmul(la, sa[:, :2], lb, sb)
    with pytest.raises(ValueError, match="2-D"):
        lns_matmul(la[0], sa[0], lb, sb)


# ---------------------------------------------------------------------- LNSLinear
def test_init_like_torch_linear():
    layer = LNSLinear(50, 30, rngs=nnx.Rngs(0))
    k, b = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    assert k.shape == (50, 30) and b.shape == (30,)
    bound = 1 / np.sqrt(50)
    assert np.abs(k).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(k).max() > 0.9 * bound and k.std() == pytest.approx(bound / np.sqrt(3), rel=0.1)
    assert LNSLinear(4, 3, bias=False, rngs=nnx.Rngs(0)).bias is None


def test_training_mode_is_plain_matmul_and_warns_once(monkeypatch):
    monkeypatch.setattr(lns_module, "_training_warning_issued", False)
    layer = LNSLinear(7, 5, algorithm="max_log", rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 7)), jnp.float32)
    expected = np.asarray(x) @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = layer(x, inference=False)
        y2 = layer(x, inference=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "inference-only" in messages[0]
    np.testing.assert_allclose(np.asarray(y1), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    # gradients flow in training mode
    grads = nnx.grad(lambda m: jnp.sum(m(x, inference=False) ** 2))(layer)
    assert np.abs(np.asarray(grads.kernel[...])).max() > 0


def test_inference_paths():
    layer = LNSLinear(9, 4, algorithm="exact", rngs=nnx.Rngs(2))
    x = np.random.default_rng(1).normal(size=(3, 5, 9)).astype(np.float32)
    x[0, 0, :3] = 0.0  # exact zeros go through log 0 = -inf
    plain = x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
    exact = np.asarray(nnx.jit(lambda m, x: m(x, inference=True))(layer, jnp.asarray(x)))
    assert exact.shape == (3, 5, 4)
    np.testing.assert_allclose(exact, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
    # max_log: the bias is added linearly to the dominant-term product
    approx = LNSLinear(9, 4, algorithm="max_log", rngs=nnx.Rngs(2))
    out = np.asarray(approx(jnp.asarray(x), inference=True))
    flat = x.reshape(-1, 9)
    la, sa, lb, sb = lns_inputs(flat, np.asarray(approx.kernel[...]))
    expected = max_log_by_loops(la, sa, lb, sb).reshape(3, 5, 4) + np.asarray(approx.bias[...])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, plain, atol=1e-3)


def test_from_linear_copies_weights():
    linear = nnx.Linear(6, 4, rngs=nnx.Rngs(3))
    linear.bias[...] = jnp.arange(4.0)
    layer = LNSLinear.from_linear(linear, algorithm="exact")
    np.testing.assert_array_equal(np.asarray(layer.kernel[...]), np.asarray(linear.kernel[...]))
    np.testing.assert_array_equal(np.asarray(layer.bias[...]), np.arange(4.0))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 6)), jnp.float32)
    np.testing.assert_allclose(np.asarray(layer(x, inference=True)), np.asarray(linear(x)), rtol=1e-5, atol=1e-5)
    no_bias = LNSLinear.from_linear(nnx.Linear(6, 4, use_bias=False, rngs=nnx.Rngs(0)))
    assert no_bias.bias is None and no_bias.algorithm == "max_log"


@pytest.mark.parametrize("kw, name", [(dict(algorithm="fast"), "algorithm"), (dict(in_features=0), "in_features"),
                                      (dict(implementation="pallas"), "implementation"),
                                      (dict(bias=1), "bias")])
def test_linear_validation(kw, name):
    args = dict(in_features=4, out_features=3) | kw
    with pytest.raises(InvalidConfigError) as info:
        LNSLinear(**args, rngs=nnx.Rngs(0))
    assert info.value.param_name == name
