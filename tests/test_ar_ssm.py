"""AdaptiveRankSemiseparableLayer: golden parity (centered conv), causality, rank mask, gradients, API."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phase1_jax.errors import InvalidConfigError
from phase1_jax.models.ar_ssm import AdaptiveRankSemiseparableLayer

D, R = 64, 16


def _layer(local_conv="causal", seed=0, **kw):
    return AdaptiveRankSemiseparableLayer(D, max_rank=R, min_rank=4, local_conv=local_conv, rngs=nnx.Rngs(seed),
                                          **kw)


def _load_torch_state(layer, path):
    torch = pytest.importorskip("torch")
    sd = {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    mapping = {
        "complexity_gate.0.weight": (layer.complexity_gate_in.kernel, lambda w: w.T),
        "complexity_gate.0.bias": (layer.complexity_gate_in.bias, lambda b: b),
        "complexity_gate.2.weight": (layer.complexity_gate_out.kernel, lambda w: w.T),
        "complexity_gate.2.bias": (layer.complexity_gate_out.bias, lambda b: b),
        "U_proj.weight": (layer.U_proj.kernel, lambda w: w.T),
        "V_proj.weight": (layer.V_proj.kernel, lambda w: w.T),
        "T_conv.weight": (layer.T_conv.kernel, lambda w: w[:, 0, :].T),  # (D, 1, 3) -> (3, D)
        "output_proj.weight": (layer.output_proj.kernel, lambda w: w.T),
        "output_proj.bias": (layer.output_proj.bias, lambda b: b),
    }
    assert set(sd) == set(mapping)
    for key, (var, hook) in mapping.items():
        value = jnp.asarray(hook(sd[key]))
        assert value.shape == var[...].shape, key
        var[...] = value


def _jit(layer, method="__call__", **kw):
    """A jitted forward taking the module state as an argument (eager NNX calls compile op by op: slow)."""
    graphdef, _ = nnx.split(layer)
    fn = jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x, **kw))
    return lambda x: fn(nnx.state(layer), x)


def _x(b=2, length=24, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, length, D)), jnp.float32)


def test_golden_ar_ssm_small(golden_dir):
    case = golden_dir / "ar_ssm_small"
    meta = json.loads((case / "case.json").read_text())["constructor"]
    layer = AdaptiveRankSemiseparableLayer(meta["d_model"], meta["max_rank"], meta["min_rank"],
                                           local_conv="centered", rngs=nnx.Rngs(0))
    _load_torch_state(layer, case / "state_dict.pt")
    if meta.get("current_max_rank") is not None:
        layer.set_rank(meta["current_max_rank"])
    x = np.load(case / "input_x.npy")
    y, aux = _jit(layer, return_gates=True)(jnp.asarray(x))
    for name, got in [("y", y), ("gates", aux["gates"]), ("effective_rank", aux["effective_rank"]),
                      ("gate_l1_loss", aux["gate_l1_loss"])]:
        want = np.load(case / f"expected_{name}.npy")
        got = np.asarray(got, np.float64)
        assert got.shape == want.shape, name
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name


def test_causal_mode_is_causal_and_centered_reads_one_ahead():
    x = _x(length=40)
    t = 17
    x2 = x.at[:, t].add(0.5)
    for mode, first_changed in (("causal", t), ("centered", t - 1)):
        layer = _layer(mode)
        fwd = _jit(layer)
        y, y2 = np.asarray(fwd(x)[0]), np.asarray(fwd(x2)[0])
        np.testing.assert_array_equal(y[:, :first_changed], y2[:, :first_changed])
        assert np.abs(y[:, first_changed] - y2[:, first_changed]).max() > 0
        assert np.abs(y[:, -1] - y2[:, -1]).max() > 0  # the scan carries it to the end


def test_causal_conv_is_centered_conv_delayed_by_one_token():
    causal, centered = _layer("causal"), _layer("centered")
    x = _x()
    np.testing.assert_allclose(causal.T_conv(x)[:, 1:], centered.T_conv(x)[:, :-1], rtol=0, atol=1e-7)
    k = np.asarray(causal.T_conv.kernel[...])
    np.testing.assert_allclose(causal.T_conv(x)[:, 0], k[2] * np.asarray(x[:, 0]), atol=1e-7)


def test_rank_mask_changes_output_without_recompiling():
    layer = _layer()
    graphdef, state = nnx.split(layer)
    traces = []

    @jax.jit
    def forward(state, x):
        traces.append(1)
        y, aux = nnx.merge(graphdef, state)(x, return_gates=True)
        return y, aux["gates"]

    x = _x()
    y_full, gates_full = forward(state, x)
    assert np.all(np.asarray(gates_full) > 0)
    layer.set_rank(5)
    y_low, gates_low = forward(nnx.state(layer), x)
    assert len(traces) == 1
    assert np.all(np.asarray(gates_low[..., 5:]) == 0)
    np.testing.assert_array_equal(gates_low[..., :5], gates_full[..., :5])
    assert np.abs(np.asarray(y_low - y_full)).max() > 0
    layer.set_rank(R)
    y_back, _ = forward(nnx.state(layer), x)
    np.testing.assert_array_equal(y_back, y_full)
    assert len(traces) == 1
    with pytest.raises(InvalidConfigError):
        layer.set_rank(R + 1)


def test_rank_schedule_matches_reference():
    # Abstract module (no parameter init): the schedule is host-side arithmetic.
    big = nnx.eval_shape(lambda: AdaptiveRankSemiseparableLayer(D, max_rank=32, min_rank=4, rngs=nnx.Rngs(0)))
    assert big.rank_for_step(250, 1000) == 11
    assert big.rank_for_step(0, 1000) == 4
    assert big.rank_for_step(5000, 1000) == 32
    layer = _layer()
    assert layer.update_rank_schedule(250, 1000) == 7  # int(4 + 0.25 * (16 - 4))
    assert int(layer.current_max_rank[...]) == 7
    _, aux = _jit(layer, return_gates=True)(_x(length=8))
    assert np.all(np.asarray(aux["gates"][..., 7:]) == 0)
    assert np.all(np.asarray(aux["gates"][..., :7]) > 0)
    assert float(aux["gate_sparsity"]) >= (R - 7) / R


def test_gate_l1_loss_reaches_gate_parameters():
    layer = _layer()
    x = _x()

    def l1(model):
        return model(x)[1]["gate_l1_loss"]

    @nnx.jit
    def both(model):
        return nnx.grad(l1)(model), nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(model)

    grads, grads_y = both(layer)
    for sub in ("complexity_gate_in", "complexity_gate_out"):
        assert float(jnp.abs(grads[sub]["kernel"][...]).max()) > 0, sub
    assert float(jnp.abs(grads["U_proj"]["kernel"][...]).max()) == 0  # the L1 term only sees the gates
    # The main output trains U through the scan (the reference's CUDA path gave U no gradient).
    assert float(jnp.abs(grads_y["U_proj"]["kernel"][...]).max()) > 0


def test_aux_definitions_and_bidirectional_formula():
    layer = _layer("centered")
    x = _x(length=12)
    y, aux = _jit(layer, return_gates=True)(x)
    g = np.asarray(aux["gates"], np.float64)
    np.testing.assert_allclose(aux["gate_l1_loss"], 1e-3 * np.abs(g).mean(), rtol=1e-6)
    np.testing.assert_allclose(aux["effective_rank"], g.sum(-1).mean(), rtol=1e-6)
    np.testing.assert_allclose(aux["gate_sparsity"], (g < 0.01).mean(), rtol=1e-6)

    xn = np.asarray(x, np.float64)
    u = xn @ np.asarray(layer.U_proj.kernel[...]) * g
    v = xn @ np.asarray(layer.V_proj.kernel[...]) * g
    w_o, b_o = np.asarray(layer.output_proj.kernel[...]), np.asarray(layer.output_proj.bias[...])
    t_out = np.asarray(layer.T_conv(x), np.float64)
    y_causal = t_out + (np.cumsum(u, 1) * v) @ w_o + b_o
    np.testing.assert_allclose(y, y_causal, atol=2e-6)
    k_rev = np.cumsum(u[:, ::-1], 1)[:, ::-1]
    y_bi, aux_bi = _jit(layer, "bidirectional")(x)
    np.testing.assert_allclose(y_bi, (y_causal + (k_rev * v) @ w_o + b_o) / 2, atol=2e-6)
    assert set(aux_bi) == {"gate_l1_loss", "effective_rank", "gate_sparsity"}


def test_complex_input_warns_and_uses_real_part():
    layer = _layer()
    x = _x(length=6)
    with pytest.warns(UserWarning, match="complex"):
        y_c, _ = _jit(layer)(x + 1j * x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_r, _ = _jit(layer)(x)
    np.testing.assert_array_equal(y_c, y_r)


def test_init_shapes_and_scales():
    layer = _layer(seed=1)
    assert layer.gate_hidden_dim == D // 4
    assert layer.complexity_gate_in.kernel[...].shape == (D, D // 4)
    assert layer.complexity_gate_out.kernel[...].shape == (D // 4, R)
    assert layer.output_proj.kernel[...].shape == (R, D)
    assert layer.T_conv.kernel[...].shape == (3, D)
    bound = 0.02 * np.sqrt(6 / (D + R))
    u = np.asarray(layer.U_proj.kernel[...])
    assert np.abs(u).max() <= bound and np.abs(u).max() > 0.9 * bound
    assert abs(np.asarray(layer.T_conv.kernel[...]).std() - 0.02) < 0.004
    assert np.all(np.asarray(layer.output_proj.bias[...]) == 0)
    small = nnx.eval_shape(lambda: AdaptiveRankSemiseparableLayer(8, 16, 4, rngs=nnx.Rngs(0)))
    assert small.gate_hidden_dim == 4  # max(D // 4, min_rank)


@pytest.mark.parametrize("kwargs,param", [
    (dict(d_model=0), "d_model"), (dict(min_rank=0), "min_rank"), (dict(max_rank=3, min_rank=4), "max_rank"),
    (dict(local_conv="left"), "local_conv"), (dict(l1_regularization=-1.0), "l1_regularization")])
def test_invalid_config(kwargs, param):
    args = dict(d_model=D, max_rank=R, min_rank=4) | kwargs
    with pytest.raises(InvalidConfigError) as info:
        AdaptiveRankSemiseparableLayer(**args, rngs=nnx.Rngs(0))
    assert info.value.param_name == param
