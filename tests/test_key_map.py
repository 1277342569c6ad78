"""The key map is read off the (abstract) model: every variable is declared, shapes follow the transforms, and
any disagreement between the rules and the model raises, naming what is wrong."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phase1_jax.config import ModelConfig
from phase1_jax.converters import key_map as km
from phase1_jax.converters.key_map import KeyMapError, abstract_model, key_map, model_key_map
from phase1_jax.converters.state_dict import load_state_into, state_from_module
from phase1_jax.models.ar_ssm import AdaptiveRankSemiseparableLayer
from phase1_jax.models.common import split_model
from phase1_jax.phase1_config import Phase1Config

TINY = dict(vocab_size=40, d_model=16, n_layers=2, n_seq=20, num_experts=3)
PHASE1 = Phase1Config(ar_ssm_max_rank=6, ar_ssm_min_rank=2, htt_rank=4, use_gradient_checkpointing=False,
                      checkpoint_ar_ssm=False, htt_position_embedding=True, ar_ssm_layers=(1,), lns_enabled=True)


@pytest.mark.parametrize("config", [ModelConfig(**TINY), ModelConfig(**TINY, phase1=PHASE1)],
                         ids=["baseline", "phase1"])
def test_rows_follow_the_model_shapes_through_the_transforms(config):
    model = abstract_model(config)
    mapping = key_map(model, "base_model.")
    _, params, buffers = split_model(model)
    leaves = {("params", *p): v.get_value() for p, v in nnx.to_flat_state(params)}
    leaves |= {("buffers", *p): v.get_value() for p, v in nnx.to_flat_state(buffers)}
    for m in mapping:
        assert m.torch_key.startswith("base_model.")
        leaf = leaves[m.jax_path]
        assert m.jax_shape == leaf.shape
        assert m.torch_shape == m.transform.torch_shape(leaf.shape if m.row is None else leaf.shape[1:])
    # Stacked experts: one torch key per row, for each of w1, b1, w2, b2 and every block.
    expert_rows = [m for m in mapping if ".moe_ffn.experts." in m.torch_key]
    assert len(expert_rows) == 4 * config.num_experts * config.n_layers
    assert mapping.rows[-2].torch_key == "base_model.lm_head.weight"
    assert mapping.rows[-2].torch_shape == (config.vocab_size, config.d_model)
    # Everything but the AR-SSM rank (not in torch state dicts) has a key; the rank is declared as not stored.
    mapped = {m.jax_path for m in mapping}
    assert set(leaves) - mapped == set(mapping.not_stored)
    assert all(p[-1] == "current_max_rank" for p in mapping.not_stored)


def test_parameter_rows_are_the_params_collection_in_torch_order():
    mapping = model_key_map(ModelConfig(**TINY, phase1=PHASE1.replace(htt_phase_encoding=False)))
    rows = mapping.parameter_rows()
    assert rows == [m for m in mapping if m.jax_path[0] == "params"]
    # Without phase encoding the HTT phase is a buffer in both frameworks, so it is not a parameter.
    assert "token_embedding.phase_shift" in {m.torch_key for m in mapping}
    assert "token_embedding.phase_shift" not in {m.torch_key for m in rows}


def test_an_undeclared_variable_is_refused_by_name():
    model = abstract_model(ModelConfig(**TINY))
    model.blocks[1].bk_layer.extra_scale = nnx.Param(jnp.ones((3,)))
    with pytest.raises(KeyMapError, match=r"1 variable\(s\) have no torch key: 'blocks\.1\.bk_layer\.extra_scale' "
                                          r"\(Param \(3,\)\)"):
        key_map(model)


def test_a_module_without_rule_is_refused():
    class Unknown(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((2,)))

    with pytest.raises(KeyMapError, match="no key rule for Unknown"):
        key_map(Unknown())


def test_a_rule_naming_a_missing_variable_is_refused(monkeypatch):
    monkeypatch.setitem(km.RULES, nnx.LayerNorm, (km.Tensor("weight", "scale"), km.Tensor("bias"),
                                                  km.Tensor("running_mean")))
    with pytest.raises(KeyMapError, match=r"LayerNorm names 'blocks\.0\.layer_norm\.running_mean', which is not "):
        model_key_map(ModelConfig(**TINY))


def test_not_stored_rank_starts_at_max_rank_and_a_live_rank_is_kept():
    layer = AdaptiveRankSemiseparableLayer(16, max_rank=6, min_rank=2, rngs=nnx.Rngs(0))
    state = state_from_module(layer, key_map(layer))
    abstract = nnx.eval_shape(lambda: AdaptiveRankSemiseparableLayer(16, max_rank=6, min_rank=2, rngs=nnx.Rngs(1)))
    loaded = load_state_into(abstract, state, key_map(abstract))
    assert int(loaded.current_max_rank[...]) == 6
    np.testing.assert_array_equal(np.asarray(loaded.U_proj.kernel[...]), np.asarray(layer.U_proj.kernel[...]))
    layer.set_rank(3)
    assert int(load_state_into(layer, state, key_map(layer)).current_max_rank[...]) == 3
