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


# ------------------------------------------------------------------ compressed head and low-rank experts


def test_tied_htt_head_equals_the_dense_expanded_head():
    model = create_phase1_model(phase1=P1.replace(lm_head="htt_tied"), **SMALL)
    assert "lm_head" in nnx.state(model, nnx.Param) and not hasattr(model.lm_head, "kernel")
    model.lm_head.bias[...] = jnp.linspace(-1.0, 1.0, SMALL["vocab_size"])
    ids = jax.random.randint(jax.random.key(2), (2, SMALL["n_seq"]), 0, SMALL["vocab_size"])
    final, _ = model.hidden_states(ids)
    logits = model.logits_from_hidden(final)
    table = np.asarray(model.token_embedding.to_dense(), np.float64)
    dense = np.asarray(final, np.float64) @ table.T + np.asarray(model.lm_head.bias[...], np.float64)
    assert logits.shape == (2, SMALL["n_seq"], SMALL["vocab_size"])
    np.testing.assert_allclose(np.asarray(logits), dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())


def test_tied_head_needs_htt_and_excludes_lns():
    with pytest.raises(ValueError, match="lm_head"):
        Phase1Config(lm_head="htt_tied", htt_enabled=False)
    with pytest.raises(ValueError, match="lm_head"):
        Phase1Config(lm_head="htt_tied", lns_enabled=True)
    with pytest.raises(ValueError, match="lm_head"):
        Phase1Config(lm_head="tied")


def test_low_rank_experts_compute_with_their_dense_product_and_cut_parameters():
    from phase1_jax.phase1 import parameter_breakdown

    dense_model = create_phase1_model(phase1=P1, **SMALL)
    low = create_phase1_model(phase1=P1.replace(expert_rank_ratio=0.25), **SMALL)
    moe = low.blocks[0].bk_layer.moe_ffn
    d, e = SMALL["d_model"], SMALL["num_experts"]
    assert moe.expert_rank == 4 and moe.w1_a[...].shape == (e, d, 4) and moe.w2_b[...].shape == (e, 4, d)
    # The low-rank forward equals the same MoE with its factors multiplied out into dense experts.
    x = jax.random.normal(jax.random.key(0), (2, 5, d))
    dense_moe = dense_model.blocks[0].bk_layer.moe_ffn
    for name, value in moe.dense_expert_weights().items():
        getattr(dense_moe, name)[...] = value
    for name in ("b1", "b2"):
        getattr(dense_moe, name)[...] = getattr(moe, name)[...]
    dense_moe.gating_network.kernel[...] = moe.gating_network.kernel[...]
    dense_moe.gating_network.bias[...] = moe.gating_network.bias[...]
    np.testing.assert_allclose(moe(x)[0], dense_moe(x)[0], rtol=1e-5, atol=1e-6)
    counts_low, counts_dense = parameter_breakdown(low), parameter_breakdown(dense_model)
    assert counts_dense["blocks_experts"] - counts_low["blocks_experts"] == SMALL["n_layers"] * e * (4 * d * d - 6 * d * 4)
    assert counts_low["total"] == sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(low, nnx.Param)))
    with pytest.raises(ValueError, match="expert_rank_ratio"):
        Phase1Config(expert_rank_ratio=1.5)


def test_parameter_breakdown_places_every_parameter():
    from phase1_jax.phase1 import parameter_breakdown

    model = create_phase1_model(phase1=P1.replace(lm_head="htt_tied", expert_rank_ratio=0.5), **SMALL)
    counts = parameter_breakdown(model)
    parts = ("token_embedding", "position_embedding", "lm_head", "blocks", "final_norm")
    assert sum(counts[p] for p in parts) == counts["total"]
    assert counts["lm_head"] == SMALL["vocab_size"]  # the tied head's bias only
    assert counts["embeddings_and_head"] == counts["token_embedding"] + counts["position_embedding"] + counts["lm_head"]


def test_recomputing_the_experts_hidden_layers_changes_no_number():
    ids = jax.random.randint(jax.random.key(4), (3, SMALL["n_seq"] + 1), 0, SMALL["vocab_size"])
    batch = Batch(inputs=ids[:, :-1], targets=ids[:, 1:])
    cfg = TrainConfig(batch_size=3, steps=3, warmup_steps=0)
    for ratio in (None, 0.5):
        runs = []
        for recompute in (False, True):
            model = create_phase1_model(phase1=P1.replace(expert_rank_ratio=ratio, checkpoint_expert_hidden=recompute),
                                        **dict(SMALL, dropout=0.2))
            graphdef, state, optimizer = create_train_state(model, cfg)
            step = make_train_step(graphdef, optimizer, model.config, cfg)
            for _ in range(2):
                state, metrics = step(state, batch)
            runs.append((float(metrics["loss"]), jax.tree_util.tree_leaves(state.params)))
        assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
        for a, b in zip(runs[0][1], runs[1][1]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
