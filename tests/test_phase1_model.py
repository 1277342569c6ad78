"""The Phase 1 model really contains its parts, is causal, trains its gates, and never recompiles for the rank."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phase1_jax.config import TrainConfig
from phase1_jax.data import Batch
from phase1_jax.phase1 import collect_phase1_diagnostics, create_phase1_model, phase1_components
from phase1_jax.phase1_config import Phase1Config
from phase1_jax.presets import run_preset
from phase1_jax.train import create_train_state, make_train_step, set_ar_ssm_rank, split_model

SMALL = dict(vocab_size=40, d_model=16, n_layers=3, n_seq=20, num_experts=2, dropout=0.0)
P1 = Phase1Config(ar_ssm_max_rank=8, ar_ssm_min_rank=2, htt_rank=4, use_gradient_checkpointing=False,
                  checkpoint_ar_ssm=False)


def test_model_contains_htt_ar_ssm_in_every_block_and_lns_when_enabled():
    model = create_phase1_model(phase1=P1, **SMALL)
    parts = phase1_components(model)
    assert parts["htt_embeddings"] == 1 and parts["ar_ssm_blocks"] == [0, 1, 2] and parts["lns_layers"] == 0
    subset = create_phase1_model(phase1=P1.replace(ar_ssm_layers=(0, 2), htt_position_embedding=True), **SMALL)
    parts = phase1_components(subset)
    assert parts["ar_ssm_blocks"] == [0, 2] and parts["htt_embeddings"] == 2
    lns = create_phase1_model(phase1=P1.replace(lns_enabled=True), **SMALL)
    assert phase1_components(lns)["lns_layers"] == 1
    assert create_phase1_model(phase1="8gb", **SMALL).config.phase1.htt_rank == 8


def test_bad_ar_ssm_layer_index_is_rejected():
    with pytest.raises(ValueError, match="ar_ssm_layers"):
        create_phase1_model(phase1=P1.replace(ar_ssm_layers=(5,)), **SMALL)


def test_tiny_phase1_model_is_causal_bit_for_bit():
    cfg = run_preset("tiny-phase1").model
    model = create_phase1_model(cfg)
    ids = jax.random.randint(jax.random.key(0), (2, cfg.n_seq), 0, cfg.vocab_size)
    f = jax.jit(lambda m, x: m(x))
    base = np.asarray(f(model, ids))
    for t in (3, 17, cfg.n_seq - 1):
        out = np.asarray(f(model, ids.at[:, t].set((ids[:, t] + 1) % cfg.vocab_size)))
        assert np.array_equal(out[:, :t], base[:, :t]) and not np.array_equal(out[:, t], base[:, t])


# The training-mode call warns once per process that LNS is inference-only (asserted in tests/test_lns.py).
@pytest.mark.filterwarnings("ignore:LNSLinear is inference-only:UserWarning")
def test_lns_head_used_at_inference_only():
    model = create_phase1_model(phase1=P1.replace(lns_enabled=True, lns_algorithm="exact", lns_use_max_log=False),
                                **SMALL)
    ids = jax.random.randint(jax.random.key(1), (1, 20), 0, 40)
    train_logits = np.asarray(model(ids))
    infer_logits = np.asarray(model(ids, inference=True))
    assert not np.array_equal(train_logits, infer_logits)  # a different computation...
    np.testing.assert_allclose(infer_logits, train_logits, rtol=1e-4, atol=1e-4)  # ...of the same matmul


def test_gate_l1_term_enters_the_loss_and_reaches_gate_gradients():
    model = create_phase1_model(phase1=P1.replace(ar_ssm_l1_regularization=0.5), **SMALL)
    ids = jax.random.randint(jax.random.key(2), (2, 21), 0, 40)
    batch = Batch(ids[:, :-1].astype(jnp.int32), ids[:, 1:].astype(jnp.int32))
    from phase1_jax.train import loss_fn

    graphdef, params, buffers = split_model(model)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, buffers, graphdef, batch, None)
    assert float(metrics["aux_loss"]) > 0
    assert float(loss) == pytest.approx(float(metrics["ce_loss"] + metrics["aux_loss"]), rel=1e-6)
    # The L1 term alone, differentiated through the whole model, moves the gate's output bias.
    def l1_only(p):
        return nnx.merge(graphdef, p, buffers).forward(batch.inputs)[1]["aux_loss"]

    g = jax.grad(l1_only)(params)
    gate_bias = np.asarray(g["blocks"][0]["ar_ssm"]["complexity_gate_out"]["bias"][...])
    assert np.abs(gate_bias).max() > 0


def test_rank_mask_change_does_not_recompile():
    model = create_phase1_model(phase1=P1, **SMALL)
    graphdef, state, optimizer = create_train_state(model, TrainConfig(batch_size=2, steps=4, warmup_steps=1))
    traces = []
    step = make_train_step(graphdef, optimizer, model.config, TrainConfig(batch_size=2, steps=4, warmup_steps=1),
                           jit=False)

    @jax.jit
    def counted(state, batch):
        traces.append(1)
        return step(state, batch)

    ids = jax.random.randint(jax.random.key(3), (2, 21), 0, 40)
    batch = Batch(ids[:, :-1].astype(jnp.int32), ids[:, 1:].astype(jnp.int32))
    losses = []
    for rank in (2, 5, 8):
        state = state.replace(buffers=set_ar_ssm_rank(state.buffers, rank))
        state, metrics = counted(state, batch)
        losses.append(float(metrics["loss"]))
    assert len(traces) == 1
    assert int(state.buffers["blocks"][1]["ar_ssm"]["current_max_rank"][...]) == 8
    assert len(set(losses)) == 3


def test_gradient_checkpointing_changes_nothing_numerically():
    ids = jax.random.randint(jax.random.key(4), (2, 21), 0, 40)
    batch = Batch(ids[:, :-1].astype(jnp.int32), ids[:, 1:].astype(jnp.int32))
    from phase1_jax.train import loss_fn

    results = []
    for ckpt in (False, True):
        model = create_phase1_model(phase1=P1.replace(use_gradient_checkpointing=ckpt), **SMALL)
        graphdef, params, buffers = split_model(model)
        results.append(jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=2)(
            params, buffers, graphdef, batch, None))
    (l0, _), g0 = results[0]
    (l1, _), g1 = results[1]
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    # Recomputation may fuse differently, so allow float32 rounding relative to each gradient's scale.
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(np.abs(b).max(), 1e-30))


def test_training_step_reports_stability_metrics():
    model = create_phase1_model(phase1=P1, **SMALL)
    cfg = TrainConfig(batch_size=2, steps=2, warmup_steps=1)
    graphdef, state, optimizer = create_train_state(model, cfg)
    ids = jax.random.randint(jax.random.key(5), (2, 21), 0, 40)
    _, metrics = make_train_step(graphdef, optimizer, model.config, cfg)(
        state, Batch(ids[:, :-1].astype(jnp.int32), ids[:, 1:].astype(jnp.int32)))
    assert float(metrics["stability/fraction_zero_rows"]) == 0.0
    assert 0 < float(metrics["stability/g_abs_max"]) <= 1.0
    assert np.isfinite(float(metrics["stability/log_det_per_token"]))


def test_collect_phase1_diagnostics():
    model = create_phase1_model(phase1=P1, **SMALL)
    ids = jax.random.randint(jax.random.key(6), (2, 20), 0, 40)
    diag = collect_phase1_diagnostics(model, ids, dense_embedding=np.asarray(model.token_embedding.to_dense()))
    assert diag["components"]["ar_ssm_layers"] == 3
    assert 0 < diag["ar_ssm_effective_rank"] <= 8 and 0 <= diag["ar_ssm_gate_sparsity"] <= 1
    assert diag["htt_compression_ratio"] == model.token_embedding.compression_ratio()
    assert diag["htt_reconstruction_error"] < 1e-6
    assert diag["stability"]["is_stable"] and diag["stability"]["warnings"] == []
    assert diag["logits_finite"]
