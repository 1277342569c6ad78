"""Declarative map between the PyTorch reference's state dict and phase1-jax's parameter tree.

The map is a list of `KeyMapping(torch_key, jax_path, transform)` in the reference's exact key order, built
from a ModelConfig. Conversion in either direction walks that list and raises one `StateDictMismatchError`
that lists every missing, unexpected, mis-shaped or mis-typed key at once. This module needs NumPy only;
reading and writing torch files lives in `torch_io.py`.

jax paths are dotted paths into {"params": ..., "buffers": ...} pure dicts (`nnx.to_pure_dict` layout, list
indices as ints).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Callable, Mapping

import numpy as np

from phase1_jax.config import ModelConfig


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


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    torch_key: str
    jax_path: str  # "params.blocks.0.layer_norm.scale" or "buffers...."
    torch_shape: tuple[int, ...]
    torch_dtype: str  # "float" (the checkpoint's float dtype), "complex64" or "int64"
    to_jax: Callable[[np.ndarray], np.ndarray] = _identity
    to_torch: Callable[[np.ndarray], np.ndarray] = _identity


def linear_rows(torch_prefix: str, jax_prefix: str, fan_in: int, fan_out: int, bias: bool = True):
    rows = [KeyMapping(f"{torch_prefix}.weight", f"{jax_prefix}.kernel", (fan_out, fan_in), "float",
                       _transpose, _transpose)]
    if bias:
        rows.append(KeyMapping(f"{torch_prefix}.bias", f"{jax_prefix}.bias", (fan_out,), "float"))
    return rows


def layer_norm_rows(torch_prefix: str, jax_prefix: str, d: int):
    return [KeyMapping(f"{torch_prefix}.weight", f"{jax_prefix}.scale", (d,), "float"),
            KeyMapping(f"{torch_prefix}.bias", f"{jax_prefix}.bias", (d,), "float")]


def htt_rows(torch_prefix: str, jax_prefix: str, vocab: int, d_model: int, rank: int,
             phase_encoding: bool) -> list[KeyMapping]:
    """HolographicTTEmbedding: core1 (v1,1,r,d1), core2 (v2,r,1,d2), phase_shift (r,) (a buffer if no phase)."""
    from phase1_jax.models.htt import tt_factorization

    v1, v2, d1, d2 = tt_factorization(vocab, d_model)
    phase_kind = "params" if phase_encoding else "buffers"
    return [KeyMapping(f"{torch_prefix}core1", f"params.{jax_prefix}core1", (v1, 1, rank, d1), "float"),
            KeyMapping(f"{torch_prefix}core2", f"params.{jax_prefix}core2", (v2, rank, 1, d2), "float"),
            KeyMapping(f"{torch_prefix}phase_shift", f"{phase_kind}.{jax_prefix}phase_shift", (rank,), "float")]


def _conv_to_jax(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w[:, 0, :].T)  # torch depthwise Conv1d weight (D, 1, 3) -> taps (3, D)


def _conv_to_torch(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.T[:, None, :])


def ar_ssm_rows(torch_prefix: str, jax_prefix: str, d_model: int, max_rank: int,
                gate_hidden_dim: int) -> list[KeyMapping]:
    """AdaptiveRankSemiseparableLayer in the reference's state-dict order (REFERENCE_SPEC §2.2)."""
    t, j = torch_prefix, f"params.{jax_prefix}"
    rows = linear_rows(f"{t}complexity_gate.0", f"{j}complexity_gate_in", d_model, gate_hidden_dim)
    rows += linear_rows(f"{t}complexity_gate.2", f"{j}complexity_gate_out", gate_hidden_dim, max_rank)
    rows += linear_rows(f"{t}U_proj", f"{j}U_proj", d_model, max_rank, bias=False)
    rows += linear_rows(f"{t}V_proj", f"{j}V_proj", d_model, max_rank, bias=False)
    rows.append(KeyMapping(f"{t}T_conv.weight", f"{j}T_conv.kernel", (d_model, 1, 3), "float",
                           _conv_to_jax, _conv_to_torch))
    rows += linear_rows(f"{t}output_proj", f"{j}output_proj", max_rank, d_model)
    return rows


def model_key_map(config: ModelConfig, torch_prefix: str = "") -> list[KeyMapping]:
    """Torch keys of a ResNetBK in order: the reference LanguageModel (REFERENCE_SPEC §1.3) for a baseline
    config; for a Phase 1 config, HTT cores in place of embedding weights (as the reference's
    Phase1IntegratedModel stores them, §2.12) and, per AR-SSM block, `ar_ssm_norm.*` and `ar_ssm.*` keys
    (phase1-jax's own layout: the reference never inserts AR-SSM layers)."""
    d, n, v, e = config.d_model, config.n_seq, config.vocab_size, config.num_experts
    p, p1 = torch_prefix, config.phase1
    from phase1_jax.models.resnet_bk import ResNetBK

    def embedding(name: str, rows: int, use_htt: bool) -> list[KeyMapping]:
        if use_htt:
            return htt_rows(f"{p}{name}.", f"{name}.", rows, d, p1.htt_rank, p1.htt_phase_encoding)
        return [KeyMapping(f"{p}{name}.weight", f"params.{name}.embedding", (rows, d), "float")]

    htt = p1 is not None and p1.htt_enabled
    rows = embedding("token_embedding", v, htt)
    rows += embedding("position_embedding", n, htt and p1.htt_position_embedding)
    ar_blocks = ResNetBK.ar_ssm_layer_indices(config)
    for i in range(config.n_layers):
        tb, jb = f"{p}blocks.{i}", f"blocks.{i}"
        if i in ar_blocks:
            hidden = p1.ar_ssm_gate_hidden_dim or max(d // 4, p1.ar_ssm_min_rank)
            rows += layer_norm_rows(f"{tb}.ar_ssm_norm", f"params.{jb}.ar_ssm_norm", d)
            rows += ar_ssm_rows(f"{tb}.ar_ssm.", f"{jb}.ar_ssm.", d, p1.ar_ssm_max_rank, hidden)
        bk, jbk = f"{tb}.bk_layer", f"{jb}.bk_layer"
        rows += layer_norm_rows(f"{tb}.layer_norm", f"params.{jb}.layer_norm", d)
        rows += [
            KeyMapping(f"{bk}.bk_scale", f"params.{jbk}.bk_scale", (), "float"),
            KeyMapping(f"{bk}.h0_diag_base", f"buffers.{jbk}.h0_diag_base", (1, n), "float"),
            KeyMapping(f"{bk}.h0_sub_base", f"buffers.{jbk}.h0_sub_base", (1, n - 1), "float"),
            KeyMapping(f"{bk}.h0_super_base", f"buffers.{jbk}.h0_super_base", (1, n - 1), "float"),
            KeyMapping(f"{bk}.z", f"buffers.{jbk}.z", (), "complex64"),
            KeyMapping(f"{bk}.moe_ffn.scattering_step_counter",
                       f"buffers.{jbk}.moe_ffn.scattering_step_counter", (), "int64",
                       lambda x: x.astype(np.int32), lambda x: x.astype(np.int64)),
        ]
        for k in range(e):
            ex, jm = f"{bk}.moe_ffn.experts.{k}", f"params.{jbk}.moe_ffn"
            rows += [
                KeyMapping(f"{ex}.0.weight", f"{jm}.w1[{k}]", (2 * d, d), "float", _transpose, _transpose),
                KeyMapping(f"{ex}.0.bias", f"{jm}.b1[{k}]", (2 * d,), "float"),
                KeyMapping(f"{ex}.3.weight", f"{jm}.w2[{k}]", (d, 2 * d), "float", _transpose, _transpose),
                KeyMapping(f"{ex}.3.bias", f"{jm}.b2[{k}]", (d,), "float"),
            ]
        rows += linear_rows(f"{bk}.moe_ffn.gating_network", f"params.{jbk}.moe_ffn.gating_network", d, e)
        rows += linear_rows(f"{bk}.v_proj", f"params.{jbk}.v_proj", d, 1)
        rows += linear_rows(f"{bk}.output_proj", f"params.{jbk}.output_proj", 2, d)
    rows += layer_norm_rows(f"{p}layer_norm_final", "params.layer_norm_final", d)
    rows += linear_rows(f"{p}lm_head", "params.lm_head", d, v)
    return rows




# --------------------------------------------------------------------------------------------------
# Nested pure-dict access with "name[index]" rows of stacked arrays.
# --------------------------------------------------------------------------------------------------

def _split_path(path: str) -> tuple[list[Any], int | None]:
    parts: list[Any] = []
    row = None
    for part in path.split("."):
        if part.endswith("]"):
            part, idx = part[:-1].split("[")
            row = int(idx)
        parts.append(int(part) if part.isdigit() else part)
    return parts, row


def get_path(tree: Mapping, path: str) -> np.ndarray:
    parts, row = _split_path(path)
    node: Any = tree
    for part in parts:
        node = node[part]
    value = np.asarray(node)
    return value[row] if row is not None else value


def set_path(tree: dict, path: str, value: np.ndarray, stacked_shapes: dict[str, tuple[int, ...]]) -> None:
    parts, row = _split_path(path)
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    leaf = parts[-1]
    if row is None:
        node[leaf] = value
    else:
        key = ".".join(str(p) for p in parts)
        if leaf not in node:
            node[leaf] = np.zeros(stacked_shapes[key], value.dtype)
        node[leaf][row] = value


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _dtype_name(x: np.ndarray) -> str:
    return str(x.dtype)


def _expected_layout(mapping: list[KeyMapping], float_dtype: str) -> list[str]:
    return [f"{m.torch_key}: {m.torch_shape} {float_dtype if m.torch_dtype == 'float' else m.torch_dtype}"
            for m in mapping]


def check_state_dict(state: Mapping[str, np.ndarray], mapping: list[KeyMapping]) -> str:
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
        raise StateDictMismatchError(problems, _expected_layout(mapping, float_dtype))
    return float_dtype


def state_dict_to_trees(state: Mapping[str, np.ndarray], mapping: list[KeyMapping],
                        stacked_shapes: dict[str, tuple[int, ...]]) -> dict[str, dict]:
    """Torch-layout arrays -> {"params": ..., "buffers": ...} pure dicts (after `check_state_dict`)."""
    trees: dict[str, dict] = {"params": {}, "buffers": {}}
    for m in mapping:
        set_path(trees, m.jax_path, m.to_jax(np.asarray(state[m.torch_key])), stacked_shapes)
    return trees


def trees_to_state_dict(trees: Mapping[str, Mapping], mapping: list[KeyMapping]) -> "OrderedDict[str, np.ndarray]":
    """{"params", "buffers"} pure dicts -> an ordered torch-layout dict of contiguous NumPy arrays."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for m in mapping:
        # np.array, not np.ascontiguousarray: the latter turns 0-d tensors (bk_scale, z, counters) into 1-d.
        out[m.torch_key] = np.array(m.to_torch(get_path(trees, m.jax_path)), order="C")
    return out


def stacked_shapes_for(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked expert arrays, keyed by their dotted jax path without the row index."""
    d, e = config.d_model, config.num_experts
    shapes = {}
    for i in range(config.n_layers):
        base = f"params.blocks.{i}.bk_layer.moe_ffn"
        shapes.update({f"{base}.w1": (e, d, 2 * d), f"{base}.b1": (e, 2 * d),
                       f"{base}.w2": (e, 2 * d, d), f"{base}.b2": (e, d)})
    return shapes


def infer_baseline_config(state: Mapping[str, np.ndarray], prefix: str = "", **overrides) -> ModelConfig:
    """Reads vocab_size, d_model, n_layers, n_seq and num_experts off the tensor shapes."""
    def shape(key):
        if f"{prefix}{key}" not in state:
            raise StateDictMismatchError([f"missing key '{prefix}{key}' (needed to infer the architecture)"])
        return tuple(state[f"{prefix}{key}"].shape)

    vocab, d_model = shape("token_embedding.weight")
    n_seq = shape("position_embedding.weight")[0]
    layers = sorted({int(k[len(prefix):].split(".")[1]) for k in state
                     if k.startswith(f"{prefix}blocks.") and k[len(prefix):].split(".")[1].isdigit()})
    if not layers:
        raise StateDictMismatchError(["no 'blocks.{i}.*' keys: cannot infer n_layers"])
    num_experts = shape("blocks.0.bk_layer.moe_ffn.gating_network.weight")[0]
    fields = dict(vocab_size=vocab, d_model=d_model, n_layers=max(layers) + 1, n_seq=n_seq,
                  num_experts=num_experts, numerics="reference")
    fields.update(overrides)
    return ModelConfig(**fields)
