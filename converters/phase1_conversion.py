"""Baseline ResNet-BK <-> Phase 1, keeping the trained weights (migration guide §3 and §5).

convert_to_phase1: every weight the two models share is copied; the token embedding (and the position
embedding, if configured) becomes the optimal rank-r HTT approximation of the trained table (truncated SVD,
Eckart–Young); AR-SSM sub-layers are added with their output projection and local conv set to zero, so each
contributes exactly 0 and the converted model computes the baseline's function up to the HTT approximation
(the report gives both errors). Gradients still reach every AR-SSM parameter after the first step, as with any
zero-initialised residual branch.

convert_from_phase1: HTT tables are expanded to dense embeddings exactly; AR-SSM layers are only dropped when
asked (`drop_ar_ssm=True`), and the report says how much the outputs change.

Both work on models; `convert_checkpoint_to_phase1` / `convert_checkpoint_from_phase1` (the `convert-to-phase1` /
`convert-from-phase1` commands) read a checkpoint, convert it and write the result with the report in meta.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from phase1_jax.checkpoint import load_checkpoint, load_run_tokenizer, read_meta, save_checkpoint
from phase1_jax.config import ModelConfig, RunConfig
from phase1_jax.errors import InvalidConfigError
from phase1_jax.models.common import split_model
from phase1_jax.models.htt import HolographicTTEmbedding
from phase1_jax.models.resnet_bk import ResNetBK
from phase1_jax.phase1_config import Phase1Config, get_preset_config
from phase1_jax.tokenizer import tokenizer_files


def _flat(tree) -> dict[str, Any]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def copy_matching(source_tree, target_tree):
    """target_tree with every leaf replaced by the source leaf at the same path and shape. Returns
    (tree, copied paths)."""
    source = _flat(source_tree)
    copied = []

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        other = source.get(key)
        if other is not None and np.shape(other) == np.shape(leaf):
            copied.append(key)
            return jnp.asarray(other, dtype=jnp.asarray(leaf).dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(pick, target_tree), copied


def carry_optimizer_state(old_opt_state, new_params, optimizer: optax.GradientTransformation):
    """A fresh optimizer state for new_params with the old moments copied wherever the parameter (same path
    and shape) exists in both models; new parameters start from the optimizer's init."""
    fresh = optimizer.init(new_params)
    carried, _ = copy_matching(old_opt_state, fresh)
    return carried


def _probe_ids(config: ModelConfig, batch: int = 2, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, config.n_seq), 0, config.vocab_size)


def _logit_difference(a: ResNetBK, b: ResNetBK, ids: jax.Array) -> dict[str, float]:
    run = nnx.jit(lambda m, x: m(x))
    la, lb = np.asarray(run(a, ids), np.float64), np.asarray(run(b, ids), np.float64)
    diff = np.abs(la - lb)
    return {"max_abs": float(diff.max()), "relative": float(np.linalg.norm(la - lb) / np.linalg.norm(la))}


def _rebuild(model: ResNetBK, config: ModelConfig, seed: int) -> tuple[ResNetBK, dict]:
    """A new model of `config` holding every parameter/buffer of `model` that it shares (path and shape)."""
    target = ResNetBK(config, rngs=nnx.Rngs(params=seed))
    graphdef, params, buffers = split_model(target)
    _, old_params, old_buffers = split_model(model)
    new_params, copied_p = copy_matching(nnx.to_pure_dict(old_params), nnx.to_pure_dict(params))
    new_buffers, copied_b = copy_matching(nnx.to_pure_dict(old_buffers), nnx.to_pure_dict(buffers))
    nnx.replace_by_pure_dict(params, new_params)
    nnx.replace_by_pure_dict(buffers, new_buffers)
    return nnx.merge(graphdef, params, buffers), {"copied": len(copied_p) + len(copied_b)}


def convert_to_phase1(model: ResNetBK, phase1: Phase1Config | None = None, *, seed: int = 0,
                      probe_ids: jax.Array | None = None, **model_changes: Any) -> tuple[ResNetBK, dict]:
    """Baseline -> Phase 1 with the trained weights. Returns (model, report)."""
    if model.config.phase1 is not None:
        raise InvalidConfigError("model.phase1", "set", "convert_to_phase1 expects a baseline model")
    phase1 = phase1 or Phase1Config()
    config = model.config.replace(phase1=phase1, **model_changes)
    converted, report = _rebuild(model, config, seed)
    if phase1.htt_enabled:
        tables = [("token_embedding", True), ("position_embedding", phase1.htt_position_embedding)]
        for name, use_htt in tables:
            if not use_htt:
                continue
            dense = np.asarray(getattr(model, name).embedding[...], np.float32)
            htt, fit = HolographicTTEmbedding.from_dense(dense, phase1.htt_rank,
                                                         phase_encoding=phase1.htt_phase_encoding)
            setattr(converted, name, htt)
            report[f"{name}_htt"] = {"relative_error": float(fit["relative_error"]),
                                     "eckart_young_bound": float(fit["error_bound"]), "rank": phase1.htt_rank,
                                     "compression_ratio": htt.compression_ratio()}
    for block in converted.blocks:
        if block.ar_ssm is not None:
            # A zero branch: y = conv(x) + ctx W_o + b_o with conv, W_o and b_o all zero.
            block.ar_ssm.output_proj.kernel[...] = jnp.zeros_like(block.ar_ssm.output_proj.kernel[...])
            block.ar_ssm.output_proj.bias[...] = jnp.zeros_like(block.ar_ssm.output_proj.bias[...])
            block.ar_ssm.T_conv.kernel[...] = jnp.zeros_like(block.ar_ssm.T_conv.kernel[...])
    ids = _probe_ids(model.config) if probe_ids is None else probe_ids
    if model.config.numerics == config.numerics and model.config.bk_direction == config.bk_direction:
        report["logit_difference"] = _logit_difference(model, converted, ids)
    return converted, report


def convert_from_phase1(model: ResNetBK, *, drop_ar_ssm: bool = False, seed: int = 0,
                        probe_ids: jax.Array | None = None) -> tuple[ResNetBK, dict]:
    """Phase 1 -> baseline: HTT expanded exactly; AR-SSM layers dropped only with drop_ar_ssm=True."""
    p1 = model.config.phase1
    if p1 is None:
        raise InvalidConfigError("model.phase1", None, "convert_from_phase1 expects a Phase 1 model")
    ar_blocks = [i for i, b in enumerate(model.blocks) if b.ar_ssm is not None]
    if ar_blocks and not drop_ar_ssm:
        raise InvalidConfigError(
            "drop_ar_ssm", False, f"the model has AR-SSM layers in blocks {ar_blocks}, which the baseline cannot "
            "hold; pass drop_ar_ssm=True (CLI: --drop-ar-ssm) to remove them and see how much the outputs change")
    config = model.config.replace(phase1=None)
    baseline, report = _rebuild(model, config, seed)
    for name in ("token_embedding", "position_embedding"):
        emb = getattr(model, name)
        if isinstance(emb, HolographicTTEmbedding):
            getattr(baseline, name).embedding[...] = emb.to_dense().astype(jnp.float32)
            report[f"{name}_expanded"] = True
    report["dropped_ar_ssm_blocks"] = ar_blocks
    ids = _probe_ids(model.config) if probe_ids is None else probe_ids
    report["logit_difference"] = _logit_difference(model, baseline, ids)
    return baseline, report


def _save_converted(out_dir: str | Path, source: RunConfig, model: ResNetBK, meta: dict,
                    source_dir: str | Path) -> Path:
    """Saves a converted model with the source run's training and data sections and its tokenizer (the
    vocabulary is unchanged by a conversion)."""
    _, params, buffers = split_model(model)
    config = type(source)(model=model.config, training=source.training, data=source.data)
    tokenizer = load_run_tokenizer(source_dir)
    return save_checkpoint(out_dir, config, params, buffers, extra_meta=dict(meta, tokenizer=tokenizer.describe()),
                           extra_files=tokenizer_files(tokenizer))


def convert_checkpoint_to_phase1(checkpoint: str | Path, out_dir: str | Path, *, preset: str | None = None,
                                 numerics: str | None = None, **phase1_changes: Any) -> tuple[Path, dict]:
    """Baseline checkpoint -> Phase 1 checkpoint. The Phase 1 config is `preset` (default: Phase1Config()) with
    `phase1_changes` applied; `numerics` replaces the model's. Returns (path, report)."""
    config, model = load_checkpoint(checkpoint)
    phase1 = get_preset_config(preset) if preset else Phase1Config()
    if phase1_changes:
        phase1 = phase1.replace(**phase1_changes)
    model_changes = {"numerics": numerics} if numerics else {}
    converted, report = convert_to_phase1(model, phase1, **model_changes)
    meta = {"conversion": "to_phase1", "conversion_report": report, "converted_from": str(checkpoint)}
    layout = read_meta(checkpoint).get("torch_layout")
    if layout:
        meta["source_torch_layout"] = layout
    return _save_converted(out_dir, config, converted, meta, checkpoint), report


def convert_checkpoint_from_phase1(checkpoint: str | Path, out_dir: str | Path, *,
                                   drop_ar_ssm: bool = False) -> tuple[Path, dict]:
    """Phase 1 checkpoint -> baseline checkpoint. Returns (path, report)."""
    config, model = load_checkpoint(checkpoint)
    baseline, report = convert_from_phase1(model, drop_ar_ssm=drop_ar_ssm)
    meta = {"conversion": "from_phase1", "conversion_report": report, "converted_from": str(checkpoint)}
    return _save_converted(out_dir, config, baseline, meta, checkpoint), report
