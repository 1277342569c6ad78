"""Moving torch-layout arrays into and out of NNX modules through a key map, checking everything on the way in.

`check_state_dict` raises one `StateDictMismatchError` that lists every missing, unexpected, mis-shaped,
mis-typed or non-finite tensor at once. Arrays cross as NumPy; reading and writing torch files is `torch_io.py`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phase1_jax.models.common import split_model

from .key_map import KeyMap, KeyMapping


class StateDictMismatchError(ValueError):
    """A state dict does not match the expected layout; `problems` lists every offending key."""

    def __init__(self, problems: list[str], expected_layout: list[str] | None = None):
        self.problems = problems
        lines = [f"state dict does not match the expected layout ({len(problems)} problem(s)):"]
        lines += [f"  - {p}" for p in problems]
        if expected_layout:
            lines.append("expected layout (key: shape dtype):")
            lines += [f"    {row}" for row in expected_layout]
        super().__init__("\n".join(lines))


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _dtype_name(x: np.ndarray) -> str:
    return str(x.dtype)


def _expected_layout(mapping: Iterable[KeyMapping], float_dtype: str) -> list[str]:
    return [f"{m.torch_key}: {m.torch_shape} {float_dtype if m.torch_dtype == 'float' else m.torch_dtype}"
            for m in mapping]


def check_state_dict(state: Mapping[str, np.ndarray], mapping: Iterable[KeyMapping]) -> str:
    """Validates keys, shapes, dtypes and finiteness; returns the checkpoint's float dtype name."""
    problems: list[str] = []
    expected = {m.torch_key: m for m in mapping}
    float_dtypes = {_dtype_name(state[k]) for k, m in expected.items() if k in state and m.torch_dtype == "float"}
    float_dtype = "float32" if not float_dtypes else sorted(float_dtypes)[0]
    if len(float_dtypes) > 1:
        problems.append(f"mixed floating dtypes {sorted(float_dtypes)}: a checkpoint must use one float dtype")
    for key in expected:
        if key not in state:
            problems.append(f"missing key '{key}'")
    for key in state:
        if key not in expected:
            problems.append(f"unexpected key '{key}' (shape {tuple(np.shape(state[key]))})")
    if float_dtype not in FLOAT_DTYPES:
        problems.append(f"floating tensors have dtype {float_dtype}; allowed: {', '.join(FLOAT_DTYPES)}")
    for key, m in expected.items():
        if key not in state:
            continue
        value = np.asarray(state[key])
        want = float_dtype if m.torch_dtype == "float" else m.torch_dtype
        if tuple(value.shape) != m.torch_shape:
            problems.append(f"'{key}' has shape {tuple(value.shape)}, expected {m.torch_shape}")
        elif _dtype_name(value) != want:
            problems.append(f"'{key}' has dtype {value.dtype}, expected {want}")
        elif m.torch_dtype == "int64":
            if not 0 <= int(value) < 2 ** 31:
                problems.append(f"'{key}' = {int(value)} is outside the int32 range counters are stored in")
        else:
            wide = value.astype(np.complex128 if m.torch_dtype == "complex64" else np.float64)
            bad = int(np.size(wide) - np.count_nonzero(np.isfinite(wide)))
            if bad:
                problems.append(f"'{key}' holds {bad} non-finite value(s) (NaN or Inf)")
    if problems:
        raise StateDictMismatchError(problems, _expected_layout(expected.values(), float_dtype))
    return float_dtype


# --------------------------------------------------------------------------------------------------------------
# Torch-layout dicts <-> {"params": ..., "buffers": ...} pure dicts.
# --------------------------------------------------------------------------------------------------------------

def _get(tree: Mapping, m: KeyMapping) -> np.ndarray:
    node: Any = tree
    for part in m.jax_path:
        node = node[part]
    value = np.asarray(node)
    return value[m.row] if m.row is not None else value


def _set(tree: dict, m: KeyMapping, value: np.ndarray) -> None:
    node = tree
    for part in m.jax_path[:-1]:
        node = node.setdefault(part, {})
    leaf = m.jax_path[-1]
    if m.row is None:
        node[leaf] = value
    else:
        if leaf not in node:
            node[leaf] = np.zeros(m.jax_shape, value.dtype)
        node[leaf][m.row] = value


def state_dict_to_trees(state: Mapping[str, np.ndarray], mapping: Iterable[KeyMapping]) -> dict[str, dict]:
    """Torch-layout arrays -> {"params": ..., "buffers": ...} pure dicts (after `check_state_dict`)."""
    trees: dict[str, dict] = {"params": {}, "buffers": {}}
    for m in mapping:
        _set(trees, m, m.to_jax(np.asarray(state[m.torch_key])))
    return trees


def trees_to_state_dict(trees: Mapping[str, Mapping],
                        mapping: Iterable[KeyMapping]) -> "OrderedDict[str, np.ndarray]":
    """{"params", "buffers"} pure dicts -> an ordered torch-layout dict of contiguous NumPy arrays."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for m in mapping:
        # np.array, not np.ascontiguousarray: the latter turns 0-d tensors (bk_scale, z, counters) into 1-d.
        out[m.torch_key] = np.array(m.to_torch(_get(trees, m)), order="C")
    return out


# --------------------------------------------------------------------------------------------------------------
# NNX modules.
# --------------------------------------------------------------------------------------------------------------

def _overlay(base: dict, new: Mapping) -> dict:
    out = dict(base)
    for key, value in new.items():
        out[key] = _overlay(base.get(key, {}), value) if isinstance(value, Mapping) else jnp.asarray(value)
    return out


def _fill_abstract(tree: dict, path: tuple, value: np.ndarray) -> None:
    """Sets a leaf that has no concrete value yet; a concrete one (e.g. a rank lowered in training) is kept."""
    for part in path[:-1]:
        tree = tree[part]
    if isinstance(tree[path[-1]], jax.ShapeDtypeStruct):
        tree[path[-1]] = jnp.asarray(value)


def load_state_into(module: nnx.Module, state: Mapping[str, np.ndarray], mapping: KeyMap) -> nnx.Module:
    """Returns a copy of `module` holding the state dict's values; every mismatch is reported at once.

    `module` may be abstract (`nnx.eval_shape`): the map's not-stored variables get their initial values.
    """
    check_state_dict(state, mapping)
    trees = state_dict_to_trees(state, mapping)
    graphdef, params, buffers = split_model(module)
    pure = {"params": _overlay(nnx.to_pure_dict(params), trees["params"]),
            "buffers": _overlay(nnx.to_pure_dict(buffers), trees["buffers"])}
    for path, value in mapping.not_stored.items():
        _fill_abstract(pure, path, value)
    nnx.replace_by_pure_dict(params, pure["params"])
    nnx.replace_by_pure_dict(buffers, pure["buffers"])
    return nnx.merge(graphdef, params, buffers)


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def state_from_module(module: nnx.Module, mapping: Iterable[KeyMapping]) -> "OrderedDict[str, np.ndarray]":
    """The torch-layout state dict of `module` (keys and order of the map)."""
    _, params, buffers = split_model(module)
    trees = {"params": _to_numpy(nnx.to_pure_dict(params)), "buffers": _to_numpy(nnx.to_pure_dict(buffers))}
    return trees_to_state_dict(trees, mapping)
