"""Baseline <-> Phase 1 conversion keeps the weights: optimal HTT, zero AR-SSM branches, exact rollback."""

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from phase1_jax.cli import main
from phase1_jax.config import ModelConfig, TrainConfig
from phase1_jax.models.common import split_model
from phase1_jax.converters.phase1_conversion import (carry_optimizer_state, convert_from_phase1,
                                                     convert_to_phase1, low_rank_factors)
from phase1_jax.errors import InvalidConfigError
from phase1_jax.models.resnet_bk import ResNetBK
from phase1_jax.phase1 import parameter_breakdown
from phase1_jax.phase1_config import Phase1Config, get_preset_config
from phase1_jax.train import make_optimizer

BASE = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_seq=12, num_experts=2, dropout=0.0)
P1 = Phase1Config(ar_ssm_max_rank=4, ar_ssm_min_rank=2, htt_rank=4, use_gradient_checkpointing=False,
                  checkpoint_ar_ssm=False)


def _trained_like(config=BASE, seed=0):
    """A baseline whose embedding is far from its init (as after training): a full-rank random table. Biases leave
    their zero init too, so that keeping them is visible."""
    model = ResNetBK(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((config.vocab_size, config.d_model)).astype(np.float32)
    model.token_embedding.embedding[...] = table * 0.3
    model.lm_head.bias[...] = rng.standard_normal(config.vocab_size).astype(np.float32)
    for block in model.blocks:
        moe = block.bk_layer.moe_ffn
        moe.b1[...] = 0.1 * rng.standard_normal(moe.b1.shape).astype(np.float32)
    return model


def test_to_phase1_reports_optimal_htt_error_and_logit_change():
    model = _trained_like()
    converted, report = convert_to_phase1(model, P1)
    htt = report["token_embedding_htt"]
    assert 0 < htt["relative_error"] < 1 and htt["relative_error"] == pytest.approx(htt["eckart_young_bound"],
                                                                                     rel=1e-4)
    assert report["logit_difference"]["max_abs"] > 0
    # With the full rank the HTT is exact, so any remaining logit change would come from AR-SSM or copying.
    full_rank = P1.replace(htt_rank=64)
    converted, report = convert_to_phase1(model, full_rank)
    assert report["token_embedding_htt"]["relative_error"] < 1e-5
    assert report["logit_difference"]["max_abs"] < 1e-4
    assert all(b.ar_ssm is not None for b in converted.blocks)


def test_round_trip_dense_embedding_is_exact():
    model = _trained_like()
    converted, _ = convert_to_phase1(model, P1)
    with pytest.raises(InvalidConfigError, match="drop_ar_ssm"):
        convert_from_phase1(converted)
    back, report = convert_from_phase1(converted, drop_ar_ssm=True)
    np.testing.assert_array_equal(np.asarray(back.token_embedding.embedding[...]),
                                  np.asarray(converted.token_embedding.to_dense()))
    assert report["dropped_ar_ssm_blocks"] == [0, 1]
    # The AR-SSM branches are still zero (never trained), so dropping them changes nothing beyond rounding.
    assert report["logit_difference"]["max_abs"] < 1e-5
    # Everything else came back bit for bit.
    _, p_orig, _ = split_model(model)
    _, p_back, _ = split_model(back)
    orig, new = nnx.to_pure_dict(p_orig), nnx.to_pure_dict(p_back)
    np.testing.assert_array_equal(np.asarray(orig["lm_head"]["kernel"]), np.asarray(new["lm_head"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(orig["blocks"][1]["bk_layer"]["moe_ffn"]["w1"]),
                                  np.asarray(new["blocks"][1]["bk_layer"]["moe_ffn"]["w1"]))


def test_dropping_trained_ar_ssm_reports_the_change():
    converted, _ = convert_to_phase1(_trained_like(), P1)
    layer = converted.blocks[0].ar_ssm
    layer.output_proj.kernel[...] = jax.random.normal(jax.random.key(0), layer.output_proj.kernel.shape)
    _, report = convert_from_phase1(converted, drop_ar_ssm=True)
    assert report["logit_difference"]["max_abs"] > 1e-3


def test_optimizer_state_is_carried_where_shapes_allow():
    model = _trained_like()
    optimizer = make_optimizer(TrainConfig())
    _, params, _ = split_model(model)
    grads = jax.tree_util.tree_map(lambda x: x * 0 + 0.5, params)
    state = optimizer.init(params)
    _, state = optimizer.update(grads, state, params)
    converted, _ = convert_to_phase1(model, P1)
    _, new_params, _ = split_model(converted)
    carried = carry_optimizer_state(state, new_params, optimizer)
    adam = [s for s in jax.tree_util.tree_leaves(carried, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    mu = adam.mu
    assert float(np.asarray(mu["lm_head"]["kernel"][...]).max()) > 0  # carried from the baseline
    assert float(np.abs(np.asarray(mu["token_embedding"]["core1"][...])).max()) == 0  # new: fresh init
    assert float(np.abs(np.asarray(mu["blocks"][0]["ar_ssm"]["U_proj"]["kernel"][...])).max()) == 0


def test_cli_round_trip(tmp_path):
    run = tmp_path / "base"
    assert main(["train", "--preset", "tiny", "--steps", "3", "--out", str(run)]) == 0
    assert main(["convert-to-phase1", str(run), str(tmp_path / "p1"), "--htt-rank", "4"]) == 0
    meta = json.loads((tmp_path / "p1" / "meta.json").read_text())
    assert meta["conversion_report"]["token_embedding_htt"]["rank"] == 4
    assert main(["convert-from-phase1", str(tmp_path / "p1"), str(tmp_path / "back")]) == 2
    assert main(["convert-from-phase1", str(tmp_path / "p1"), str(tmp_path / "back"), "--drop-ar-ssm"]) == 0
    ids = np.random.default_rng(0).integers(0, 256, size=(1, 32))
    np.save(tmp_path / "ids.npy", ids)
    for name in ("p1", "back"):
        assert main(["logits", str(tmp_path / name), "--ids", str(tmp_path / "ids.npy"),
                     "--out", str(tmp_path / f"{name}.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "p1.npy"), np.load(tmp_path / "back.npy"), atol=1e-5)


def test_checkpoint_conversion_records_its_source(tmp_path):
    """convert_checkpoint_to/from_phase1 keep training/data, apply the preset, changes and numerics, and write the
    report, the source and (for an imported checkpoint) its torch layout into meta.json."""
    from phase1_jax.checkpoint import load_checkpoint, save_checkpoint
    from phase1_jax.config import DataConfig, RunConfig
    from phase1_jax.converters.phase1_conversion import (convert_checkpoint_from_phase1,
                                                         convert_checkpoint_to_phase1)

    model = _trained_like(BASE.replace(numerics="reference", n_seq=8))
    _, params, buffers = split_model(model)
    source = RunConfig(model=model.config, training=TrainConfig(steps=7), data=DataConfig(val_fraction=0.1))
    save_checkpoint(tmp_path / "base", source, params, buffers, extra_meta={"torch_layout": "baseline"})
    path, report = convert_checkpoint_to_phase1(tmp_path / "base", tmp_path / "p1", preset="8gb", numerics="native",
                                                ar_ssm_max_rank=4, ar_ssm_min_rank=2)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["conversion"] == "to_phase1" and meta["converted_from"] == str(tmp_path / "base")
    assert meta["source_torch_layout"] == "baseline" and meta["conversion_report"] == json.loads(json.dumps(report))
    config, converted = load_checkpoint(path)
    assert config.training == source.training and config.data == source.data
    assert config.model.numerics == "native" and config.model.phase1.htt_rank == 8  # the 8gb preset's rank
    assert converted.blocks[0].ar_ssm.max_rank == 4
    assert "logit_difference" not in report  # numerics changed: the two models compute different functions
    assert report["experts_low_rank"]["rank"] == 4 and report["lm_head"]["bias_kept"]  # 8gb: rank d/4, tied head

    path, report = convert_checkpoint_from_phase1(path, tmp_path / "back", drop_ar_ssm=True)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["conversion"] == "from_phase1" and meta["converted_from"] == str(tmp_path / "p1")
    assert "source_torch_layout" not in meta and report["dropped_ar_ssm_blocks"] == [0, 1]
    assert report["experts_expanded"] == {"rank": 4} and report["lm_head_untied"]
    assert report["logit_difference"]["max_abs"] < 1e-5
    assert load_checkpoint(path)[0].model.phase1 is None


def test_cli_tied_low_rank_conversion_exports_to_torch(tmp_path, capsys):
    """convert-to-phase1 with a tied head and low-rank experts, then export-torch: the file loads strictly into the
    PyTorch twin, which computes the checkpoint's logits, and imports back to the same logits bit for bit."""
    torch = pytest.importorskip("torch")
    from phase1_jax.checkpoint import load_checkpoint, save_checkpoint
    from phase1_jax.config import RunConfig
    from phase1_jax.converters.torch_twins import build_torch_twin

    model = _trained_like()
    _, params, buffers = split_model(model)
    save_checkpoint(tmp_path / "base", RunConfig(model=model.config), params, buffers)
    assert main(["convert-to-phase1", str(tmp_path / "base"), str(tmp_path / "bad"), "--preset", "10gb",
                 "--expert-rank-ratio", "1.5"]) == 2
    assert "expert_rank_ratio" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # 10gb ties the head; the flag adds experts of rank 0.5 * 16 = 8.
    assert main(["convert-to-phase1", str(tmp_path / "base"), str(tmp_path / "p1"), "--preset", "10gb",
                 "--expert-rank-ratio", "0.5"]) == 0
    report = json.loads((tmp_path / "p1" / "meta.json").read_text())["conversion_report"]
    assert report["experts_low_rank"]["rank"] == 8 and report["lm_head"]["replaced"] == "dense -> htt_tied"
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 12))
    np.save(tmp_path / "ids.npy", ids)
    assert main(["logits", str(tmp_path / "p1"), "--ids", str(tmp_path / "ids.npy"),
                 "--out", str(tmp_path / "p1.npy")]) == 0
    assert main(["export-torch", str(tmp_path / "p1"), str(tmp_path / "p1.pt")]) == 0
    state = torch.load(tmp_path / "p1.pt", weights_only=True)
    assert "lm_head.weight" not in state and "blocks.0.bk_layer.moe_ffn.experts.1.3.a.weight" in state
    twin = build_torch_twin(load_checkpoint(tmp_path / "p1")[0].model)
    twin.load_state_dict(state, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(twin(torch.from_numpy(ids)).numpy(), np.load(tmp_path / "p1.npy"), atol=1e-5)
    assert main(["import-torch", str(tmp_path / "p1.pt"), str(tmp_path / "back"), "--numerics", "native"]) == 0
    assert main(["logits", str(tmp_path / "back"), "--ids", str(tmp_path / "ids.npy"),
                 "--out", str(tmp_path / "back.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "back.npy"), np.load(tmp_path / "p1.npy"))


def test_low_rank_factors_are_the_truncated_svd():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 16, 32)) * np.linspace(2.0, 0.1, 16)[None, :, None]  # a decaying spectrum
    w[2] = 0.0
    a, b, fit = low_rank_factors(w.astype(np.float32), 4)
    assert a.shape == (3, 16, 4) and b.shape == (3, 4, 32) and a.dtype == b.dtype == np.float32
    for e in range(2):
        u, s, vt = np.linalg.svd(w[e].astype(np.float32).astype(np.float64))
        best = (u[:, :4] * s[:4]) @ vt[:4]
        np.testing.assert_allclose(a[e].astype(np.float64) @ b[e], best, atol=1e-5)
        bound = np.sqrt(np.sum(s[4:] ** 2)) / np.linalg.norm(s)
        assert fit["error_bound"][e] == pytest.approx(bound, rel=1e-12)
        # Eckart-Young: nothing of rank 4 does better; the stored float32 factors reach the bound up to rounding.
        assert fit["relative_error"][e] == pytest.approx(bound, rel=1e-5)
        # sqrt(S) on both sides: the factors have equal column / row norms.
        np.testing.assert_allclose(np.linalg.norm(a[e], axis=0), np.linalg.norm(b[e], axis=1), rtol=1e-5)
    assert fit["relative_error"][2] == fit["error_bound"][2] == 0 and not np.any(a[2])  # a zero matrix stays zero
    exact = np.einsum("emk,ekn->emn", a, b)  # already rank 4: refactoring loses only float32 rounding
    assert low_rank_factors(exact, 4)[2]["relative_error"][:2].max() < 1e-6
    _, _, bf16 = low_rank_factors(w, 4, jax.numpy.bfloat16)
    assert np.all(bf16["relative_error"][:2] >= fit["error_bound"][:2])
    assert np.all(bf16["relative_error"][:2] < fit["error_bound"][:2] + 1e-2)


def test_8gb_preset_keeps_the_trained_weights_and_comes_back_exactly():
    """Tied HTT head + experts of rank d/4: optimal factors, biases kept, and the rollback to a dense head and
    dense experts computes the Phase 1 model's logits."""
    model = _trained_like()
    converted, report = convert_to_phase1(model, get_preset_config("8gb"))
    experts = report["experts_low_rank"]
    assert experts["rank"] == 4 and experts["expert_rank_ratio"] == 0.25
    assert experts["matrices"] == BASE.n_layers * 2 * BASE.num_experts
    assert experts["compression_ratio"] == pytest.approx(4 * (16 + 32) / (16 * 32))
    assert 0 < experts["relative_error"]["max"] < 1
    for stat in ("max", "mean"):
        assert experts["relative_error"][stat] == pytest.approx(experts["eckart_young_bound"][stat], rel=1e-5)
    trained = np.asarray(model.blocks[1].bk_layer.moe_ffn.w2[...], np.float64)[0]
    u, s, vt = np.linalg.svd(trained)
    factored = np.asarray(converted.blocks[1].bk_layer.moe_ffn.dense_expert_weights()["w2"], np.float64)[0]
    np.testing.assert_allclose(factored, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)
    for name in ("b1", "b2"):
        np.testing.assert_array_equal(np.asarray(getattr(converted.blocks[0].bk_layer.moe_ffn, name)[...]),
                                      np.asarray(getattr(model.blocks[0].bk_layer.moe_ffn, name)[...]))
    head = report["lm_head"]
    assert head["replaced"] == "dense -> htt_tied" and head["bias_kept"]
    assert head["dropped_parameters"] == 64 * 16 and head["relative_difference"] > 0.5  # untied: unrelated tables
    np.testing.assert_array_equal(np.asarray(converted.lm_head.bias[...]), np.asarray(model.lm_head.bias[...]))
    assert parameter_breakdown(converted)["lm_head"] == 64
    assert report["logit_difference"]["max_abs"] > 1e-2

    back, back_report = convert_from_phase1(converted, drop_ar_ssm=True)
    assert back_report["experts_expanded"] == {"rank": 4} and back_report["lm_head_untied"]
    assert back.config.phase1 is None
    np.testing.assert_array_equal(np.asarray(back.lm_head.kernel[...]),
                                  np.asarray(converted.token_embedding.to_dense()).T)
    np.testing.assert_array_equal(np.asarray(back.lm_head.bias[...]), np.asarray(model.lm_head.bias[...]))
    np.testing.assert_array_equal(np.asarray(back.blocks[1].bk_layer.moe_ffn.w1[...]),
                                  np.asarray(converted.blocks[1].bk_layer.moe_ffn.dense_expert_weights()["w1"]))
    # The same function computed in another order: x (A B) for (x A) B, h E^T for the core contraction.
    assert back_report["logit_difference"]["max_abs"] < 1e-5
