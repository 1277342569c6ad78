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
                                                     convert_to_phase1)
from phase1_jax.errors import InvalidConfigError
from phase1_jax.models.resnet_bk import ResNetBK
from phase1_jax.phase1_config import Phase1Config
from phase1_jax.train import make_optimizer

BASE = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_seq=12, num_experts=2, dropout=0.0)
P1 = Phase1Config(ar_ssm_max_rank=4, ar_ssm_min_rank=2, htt_rank=4, use_gradient_checkpointing=False,
                  checkpoint_ar_ssm=False)


def _trained_like(config=BASE, seed=0):
    """A baseline whose embedding is far from its init (as after training): a full-rank random table."""
    model = ResNetBK(config, rngs=nnx.Rngs(seed))
    table = np.random.default_rng(seed).standard_normal((config.vocab_size, config.d_model)).astype(np.float32)
    model.token_embedding.embedding[...] = table * 0.3
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

    path, report = convert_checkpoint_from_phase1(path, tmp_path / "back", drop_ar_ssm=True)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["conversion"] == "from_phase1" and meta["converted_from"] == str(tmp_path / "p1")
    assert "source_torch_layout" not in meta and report["dropped_ar_ssm_blocks"] == [0, 1]
    assert load_checkpoint(path)[0].model.phase1 is None
