"""Moving torch-layout arrays into and out of NNX modules through a declarative key map."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from phase1_jax.models.common import Buffer, RankState

from .state_dict import KeyMapping, check_state_dict, linear_rows, state_dict_to_trees, trees_to_state_dict


def split_module(module: nnx.Module):
    """(graphdef, params, buffers): the same split as training uses, for any module."""
    graphdef, params, buffers, rest = nnx.split(module, nnx.Param, (Buffer, RankState), ...)
    if nnx.to_flat_state(rest):
        raise TypeError(f"{type(module).__name__} holds variables that are neither Param nor Buffer/RankState")
    return graphdef, params, buffers


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
    graphdef, params, buffers = split_module(module)
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
    _, params, buffers = split_module(module)
    trees = {"params": _to_numpy(nnx.to_pure_dict(params)), "buffers": _to_numpy(nnx.to_pure_dict(buffers))}
    return trees_to_state_dict(trees, mapping)


def htt_key_map(torch_prefix: str, jax_prefix: str, emb) -> list[KeyMapping]:
    """HolographicTTEmbedding: core1 (v1,1,r,d1), core2 (v2,r,1,d2), phase_shift (r,) (a buffer if no phase)."""
    v1, v2, d1, d2, r = emb.v1, emb.v2, emb.d1, emb.d2, emb.rank
    phase_kind = "params" if emb.phase_encoding else "buffers"
    sep = "." if jax_prefix else ""
    return [
        KeyMapping(f"{torch_prefix}core1", f"params.{jax_prefix}{sep}core1", (v1, 1, r, d1), "float"),
        KeyMapping(f"{torch_prefix}core2", f"params.{jax_prefix}{sep}core2", (v2, r, 1, d2), "float"),
        KeyMapping(f"{torch_prefix}phase_shift", f"{phase_kind}.{jax_prefix}{sep}phase_shift", (r,), "float"),
    ]


def _conv_to_jax(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w[:, 0, :].T)  # torch depthwise Conv1d (D, 1, 3) -> taps (3, D)


def _conv_to_torch(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.T[:, None, :])


def ar_ssm_key_map(torch_prefix: str, jax_prefix: str, d_model: int, max_rank: int,
                   gate_hidden_dim: int) -> list[KeyMapping]:
    """AdaptiveRankSemiseparableLayer, in the reference's state-dict order (REFERENCE_SPEC §2.2)."""
    sep = "." if jax_prefix else ""
    j = f"params.{jax_prefix}{sep}"
    rows = linear_rows(f"{torch_prefix}complexity_gate.0", f"{j}complexity_gate_in", d_model, gate_hidden_dim)
    rows += linear_rows(f"{torch_prefix}complexity_gate.2", f"{j}complexity_gate_out", gate_hidden_dim, max_rank)
    rows += linear_rows(f"{torch_prefix}U_proj", f"{j}U_proj", d_model, max_rank, bias=False)
    rows += linear_rows(f"{torch_prefix}V_proj", f"{j}V_proj", d_model, max_rank, bias=False)
    rows.append(KeyMapping(f"{torch_prefix}T_conv.weight", f"{j}T_conv.kernel", (d_model, 1, 3), "float",
                           _conv_to_jax, _conv_to_torch))
    rows += linear_rows(f"{torch_prefix}output_proj", f"{j}output_proj", max_rank, d_model)
    return rows
