"""Moving torch-layout arrays into and out of NNX modules through a declarative key map."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from phase1_jax.models.common import split_model

from .state_dict import KeyMapping, ar_ssm_rows, check_state_dict, htt_rows, state_dict_to_trees, trees_to_state_dict


def _overlay(base: dict, new: Mapping) -> dict:
    out = dict(base)
    for key, value in new.items():
        out[key] = _overlay(base.get(key, {}), value) if isinstance(value, Mapping) else jnp.asarray(value)
    return out


def load_state_into(module: nnx.Module, state: Mapping[str, np.ndarray], mapping: list[KeyMapping],
                    stacked_shapes: dict[str, tuple[int, ...]] | None = None) -> nnx.Module:
    """Returns a copy of `module` holding the state dict's values; every mismatch is reported at once.

    Variables the map does not name (e.g. AR-SSM's traced rank) keep their values. Works on abstract modules
    from `nnx.eval_shape` too, as long as the map covers every variable that has no concrete value.
    """
    check_state_dict(state, mapping)
    trees = state_dict_to_trees(state, mapping, stacked_shapes or {})
    graphdef, params, buffers = split_model(module)
    params_pure = _overlay(nnx.to_pure_dict(params), trees["params"])
    buffers_pure = _overlay(nnx.to_pure_dict(buffers), trees["buffers"])
    nnx.replace_by_pure_dict(params, params_pure)
    nnx.replace_by_pure_dict(buffers, buffers_pure)
    return nnx.merge(graphdef, params, buffers)


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def state_from_module(module: nnx.Module, mapping: list[KeyMapping]) -> "OrderedDict[str, np.ndarray]":
    """The torch-layout state dict of `module` (keys and order of the map)."""
    _, params, buffers = split_model(module)
    trees = {"params": _to_numpy(nnx.to_pure_dict(params)), "buffers": _to_numpy(nnx.to_pure_dict(buffers))}
    return trees_to_state_dict(trees, mapping)


def htt_key_map(torch_prefix: str, jax_prefix: str, emb) -> list[KeyMapping]:
    """The key map of a standalone HolographicTTEmbedding module."""
    return htt_rows(torch_prefix, jax_prefix, emb.vocab_size, emb.d_model, emb.rank, emb.phase_encoding)


def ar_ssm_key_map(torch_prefix: str, jax_prefix: str, layer) -> list[KeyMapping]:
    """The key map of a standalone AdaptiveRankSemiseparableLayer."""
    return ar_ssm_rows(torch_prefix, jax_prefix, layer.d_model, layer.max_rank, layer.gate_hidden_dim)
