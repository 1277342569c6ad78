import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phase1_jax.config import ModelConfig, TrainConfig
from phase1_jax.data import Batch
from phase1_jax.train import (build_model, create_train_state, decay_mask, expert_has_grad, learning_rate_schedule,
                              loss_fn, lr_multiplier, make_train_step, rank_for_step, split_model)

MODEL = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_seq=16, num_experts=2, dropout=0.0)


def _batch(seed=0, length=16, vocab=32):
    ids = jax.random.randint(jax.random.key(seed), (4, length + 1), 0, vocab)
    return Batch(inputs=ids[:, :-1].astype(jnp.int32), targets=ids[:, 1:].astype(jnp.int32))


def _run(model_cfg, train_cfg, steps, batch):
    graphdef, state, optimizer = create_train_state(build_model(model_cfg), train_cfg)
    step_fn = make_train_step(graphdef, optimizer, model_cfg, train_cfg)
    history = []
    for _ in range(steps):
        state, metrics = step_fn(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def test_training_reduces_loss_on_a_fixed_batch():
    cfg = TrainConfig(batch_size=4, steps=40, learning_rate=1e-2, warmup_steps=2)
    state, history = _run(MODEL, cfg, 40, _batch())
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert int(state.step) == 40
    for key in ("loss", "ce_loss", "aux_loss", "grad_norm", "learning_rate"):
        assert np.isfinite(history[-1][key])


def test_bf16_compute_keeps_float32_params():
    cfg = TrainConfig(batch_size=4, steps=5, compute_dtype="bfloat16", warmup_steps=1)
    state, history = _run(MODEL, cfg, 5, _batch())
    assert all(np.isfinite(h["loss"]) for h in history)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))


def test_train_step_is_pure_and_deterministic():
    cfg = TrainConfig(batch_size=4, steps=3, warmup_steps=1)
    _, h1 = _run(MODEL.replace(dropout=0.2), cfg, 3, _batch())
    _, h2 = _run(MODEL.replace(dropout=0.2), cfg, 3, _batch())
    assert h1 == h2


def test_scattering_counter_advances_only_in_reference_mode():
    cfg = TrainConfig(batch_size=4, steps=2, warmup_steps=1)
    ref_cfg = MODEL.replace(numerics="reference")
    state, _ = _run(ref_cfg, cfg, 3, _batch())
    counter = state.buffers["blocks"][0]["bk_layer"]["moe_ffn"]["scattering_step_counter"]
    assert int(counter[...]) == 3
    state, _ = _run(MODEL, cfg, 3, _batch())
    counter = state.buffers["blocks"][0]["bk_layer"]["moe_ffn"]["scattering_step_counter"]
    assert int(counter[...]) == 0


def test_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=100, learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(100)) == pytest.approx(1e-4) and float(lr(55)) < 1e-3


def test_gradient_clipping_is_applied_before_adamw():
    # Clipping the global norm to 1e-12 makes every gradient entry far below Adam's eps (1e-8), so the first
    # update nearly vanishes; without clipping Adam moves each parameter by about the learning rate.
    def first_update_size(clip):
        cfg = TrainConfig(batch_size=4, steps=2, grad_clip_norm=clip, warmup_steps=0, learning_rate=1e-3,
                          weight_decay=0.0)
        graphdef, state, optimizer = create_train_state(build_model(MODEL), cfg)
        before = jax.tree_util.tree_map(np.asarray, state.params)
        state, metrics = make_train_step(graphdef, optimizer, MODEL, cfg, jit=False)(state, _batch())
        deltas = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(b) - a).max(), before, state.params)
        return max(jax.tree_util.tree_leaves(deltas)), float(metrics["grad_norm"])

    clipped, raw_norm = first_update_size(1e-12)
    free, _ = first_update_size(10.0)
    assert raw_norm > 1e-3  # the metric reports the norm before clipping
    assert free > 5e-4 and clipped < 1e-5


def test_rank_curriculum_matches_reference_sequence():
    # REFERENCE_SPEC §2.9: (4, 32) with warmup 10 over successive steps.
    assert [rank_for_step(s, 4, 32, 10) for s in range(12)] == [4, 6, 9, 12, 15, 18, 20, 23, 26, 29, 32, 32]


@pytest.mark.parametrize("head", ["dense", "htt_tied"])
def test_chunked_loss_equals_the_whole_batch_loss_and_its_gradients(head):
    from phase1_jax.phase1_config import Phase1Config

    p1 = None if head == "dense" else Phase1Config(lm_head="htt_tied", ar_ssm_max_rank=4, htt_rank=4)
    model_cfg = MODEL.replace(phase1=p1, vocab_size=40)
    batch = _batch(length=16, vocab=40)
    results = []
    for chunk in (None, 7):  # 4 x 16 = 64 tokens: 9 chunks, the last one padded
        cfg = TrainConfig(batch_size=4, steps=3, warmup_steps=0, loss_chunk_tokens=chunk)
        state, history = _run(model_cfg, cfg, 3, batch)
        results.append((history, jax.tree_util.tree_leaves(state.params)))
    (h_whole, p_whole), (h_chunked, p_chunked) = results
    for a, b in zip(h_whole, h_chunked):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for a, b in zip(p_whole, p_chunked):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        TrainConfig(loss_chunk_tokens=0)


def test_lr_multiplier_is_the_schedule_in_doubles():
    cfg = TrainConfig(steps=100, learning_rate=2e-3, warmup_steps=10, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    for step in (0, 3, 10, 11, 55, 99, 100, 150):
        assert cfg.learning_rate * lr_multiplier(cfg, step) == pytest.approx(float(lr(step)), rel=1e-6, abs=1e-12)
    constant = TrainConfig(steps=10, warmup_steps=0, min_lr_ratio=1.0)
    assert {lr_multiplier(constant, step) for step in range(12)} == {1.0}


def test_decay_mask_judges_each_torch_tensor():
    _, params, _ = split_model(build_model(MODEL))
    mask = decay_mask(params)
    moe = {k: mask["blocks"][0]["bk_layer"]["moe_ffn"][k].get_value() for k in ("w1", "b1", "w2", "b2")}
    assert moe == {"w1": True, "b1": False, "w2": True, "b2": False}
    assert mask["lm_head"]["kernel"].get_value() and not mask["lm_head"]["bias"].get_value()
    assert not mask["blocks"][0]["bk_layer"]["bk_scale"].get_value()


def _model_routing_everything_to_expert_0(numerics="reference"):
    model = build_model(MODEL.replace(numerics=numerics, num_experts=3))
    gate = model.blocks[0].bk_layer.moe_ffn.gating_network
    gate.bias[...] = jnp.asarray([1e3, 0.0, 0.0])  # top_k = 1: every token goes to expert 0
    return model


def test_experts_without_tokens_have_no_gradient():
    graphdef, params, buffers = split_model(_model_routing_everything_to_expert_0())
    (_, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=2)(
        params, buffers, graphdef, _batch(), None)
    has = expert_has_grad(grads)
    moe = has["blocks"][0]["bk_layer"]["moe_ffn"]
    for leaf in ("w1", "b1", "w2", "b2"):
        assert np.asarray(moe[leaf][...]).tolist() == [True, False, False]
    assert has["blocks"][0]["bk_layer"]["moe_ffn"]["gating_network"]["kernel"].get_value() is True


def test_torch_adamw_leaves_experts_without_tokens_untouched():
    """As torch skips a tensor whose .grad is None: no decay, no moments, no step count; the gating network
    (zero gradient, but a gradient) is decayed as torch decays it."""
    cfg = TrainConfig(batch_size=4, steps=3, optimizer="torch_adamw", weight_decay=0.1, warmup_steps=0,
                      grad_clip_norm=None)
    model = _model_routing_everything_to_expert_0()
    graphdef, state, optimizer = create_train_state(model, cfg)
    before = jax.tree_util.tree_map(np.asarray, state.params)
    step_fn = make_train_step(graphdef, optimizer, model.config, cfg)
    for _ in range(2):
        state, metrics = step_fn(state, _batch())
    assert np.isfinite(float(metrics["loss"]))
    moe, moe0 = state.params["blocks"][0]["bk_layer"]["moe_ffn"], before["blocks"][0]["bk_layer"]["moe_ffn"]
    adam = state.opt_state[-1]
    for leaf in ("w1", "b1", "w2", "b2"):
        new, old = np.asarray(moe[leaf][...]), moe0[leaf][...]
        np.testing.assert_array_equal(new[1:], old[1:])
        assert not np.array_equal(new[0], old[0])
        assert not np.any(np.asarray(adam.mu["blocks"][0]["bk_layer"]["moe_ffn"][leaf][...])[1:])
        assert np.asarray(adam.count["blocks"][0]["bk_layer"]["moe_ffn"][leaf][...]).reshape(-1).tolist() == [2, 0, 0]
    expected = moe0["gating_network"]["kernel"][...]
    for step in range(2):
        expected = expected * np.float32(1 - cfg.learning_rate * lr_multiplier(cfg, step) * 0.1)
    np.testing.assert_array_equal(np.asarray(moe["gating_network"]["kernel"][...]), expected)


def test_torch_adam_trains_and_grad_clip_null_is_no_clipping():
    cfg = TrainConfig(batch_size=4, steps=30, learning_rate=1e-2, warmup_steps=2, optimizer="torch_adam",
                      grad_clip_norm=None, weight_decay=0.0)
    state, history = _run(MODEL, cfg, 30, _batch())
    assert history[-1]["loss"] < 0.6 * history[0]["loss"] and int(state.step) == 30
