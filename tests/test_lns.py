"""LNSLinear, the linear layer with an LNS matmul at inference (phase1_jax/models/lns.py).

The LNS matmul op itself is tested in tests/test_lns_matmul.py.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import phase1_jax.models.lns as lns_module
from helpers import lns_inputs, max_log_by_loops
from phase1_jax.errors import InvalidConfigError
from phase1_jax.models.lns import LNSLinear


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
