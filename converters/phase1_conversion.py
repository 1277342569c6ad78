"""Baseline ResNet-BK <-> Phase 1, keeping the trained weights (migration guide §3 and §5).

convert_to_phase1: every weight the two models share is copied; the token embedding (and the position
embedding, if configured) becomes the optimal rank-r HTT approximation of the trained table (truncated SVD,
Eckart–Young); AR-SSM sub-layers are added with their output projection and local conv set to zero, so each
contributes exactly 0 and the converted model computes the baseline's function up to the HTT approximation
(the report gives both errors). Gradients still reach every AR-SSM parameter after the first step, as with any
zero-initialised residual branch. Low-rank experts (`expert_rank_ratio`) get the optimal rank-k factors of each
trained expert matrix (truncated SVD, Eckart–Young). A tied head (`lm_head="htt_tied"`) replaces the trained dense
head by the HTT token embedding and keeps the dense head's bias; the report says how far the dense head was from
that table and, like every approximation here, how much the logits changed.

convert_from_phase1: HTT tables are expanded to dense embeddings, low-rank experts to their products and a tied
head to a dense head whose kernel is the embedding table, all exactly; AR-SSM layers are only dropped when asked
(`drop_ar_ssm=True`), and the report says how much the outputs change.

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
from phase1_jax.models.resnet_bk import ResNetBK, TiedHTTHead, expert_rank
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


def _assign(variable: nnx.Variable, value: Any) -> None:
    """Sets a variable's value in the variable's own dtype (a bfloat16 model stays bfloat16)."""
    variable[...] = jnp.asarray(value, dtype=variable[...].dtype)


def low_rank_factors(w: Any, rank: int, dtype: Any = jnp.float32) -> tuple[np.ndarray, np.ndarray, dict]:
    """Best rank-`rank` factors of each matrix of a stack W (E, m, n): A (E, m, k) and B (E, k, n), A·B the truncated
    SVD (Eckart–Young) in float64 with sqrt(S) on both sides, so the two factors share one scale. Returns (A, B, fit)
    with, per matrix, fit["relative_error"] = ||W - A·B||_F / ||W||_F of the factors as stored in `dtype`, and
    fit["error_bound"] = sqrt(sum_{i>=k} s_i^2) / ||W||_F, the smallest error any rank-k matrix can have."""
    w64 = np.asarray(w, np.float64)
    u, s, vt = np.linalg.svd(w64, full_matrices=False)
    root = np.sqrt(s[:, :rank])
    a = jnp.asarray(u[:, :, :rank] * root[:, None, :], dtype)
    b = jnp.asarray(root[:, :, None] * vt[:, :rank], dtype)
    stored = np.einsum("emk,ekn->emn", np.asarray(a, np.float64), np.asarray(b, np.float64))
    norms = np.linalg.norm(w64, axis=(1, 2))
    scale = np.where(norms > 0, norms, 1.0)  # a zero matrix has zero factors and error 0
    fit = {"relative_error": np.linalg.norm(stored - w64, axis=(1, 2)) / scale,
           "error_bound": np.sqrt(np.sum(s[:, rank:] ** 2, axis=1)) / scale}
    return np.asarray(a), np.asarray(b), fit


def _factor_experts(model: ResNetBK, converted: ResNetBK, rank: int) -> dict[str, Any]:
    """Sets every low-rank expert of `converted` to the optimal factors of `model`'s dense one; returns the report."""
    errors, bounds, dense_size, factor_size = [], [], 0, 0
    for old, new in zip(model.blocks, converted.blocks):
        moe = new.bk_layer.moe_ffn
        for name, w in old.bk_layer.moe_ffn.dense_expert_weights().items():
            a_var, b_var = getattr(moe, f"{name}_a"), getattr(moe, f"{name}_b")
            a, b, fit = low_rank_factors(w, rank, a_var[...].dtype)
            _assign(a_var, a)
            _assign(b_var, b)
            errors.extend(fit["relative_error"])
            bounds.extend(fit["error_bound"])
            dense_size, factor_size = dense_size + w.size, factor_size + a.size + b.size
    return {"rank": rank, "matrices": len(errors),
            "relative_error": {"max": float(np.max(errors)), "mean": float(np.mean(errors))},
            "eckart_young_bound": {"max": float(np.max(bounds)), "mean": float(np.mean(bounds))},
            "compression_ratio": factor_size / dense_size}


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
    if phase1.lm_head == "htt_tied":
        # _rebuild copied the dense head's bias (same path and shape); its kernel has no place in a tied model.
        head = np.asarray(model.lm_head.kernel[...], np.float64).T
        table = np.asarray(converted.token_embedding.to_dense(), np.float64)
        report["lm_head"] = {"replaced": "dense -> htt_tied", "bias_kept": True,
                             "dropped_parameters": int(head.size),
                             "relative_difference": float(np.linalg.norm(head - table) / np.linalg.norm(head))}
    rank = expert_rank(config)
    if rank is not None:
        report["experts_low_rank"] = dict(_factor_experts(model, converted, rank),
                                          expert_rank_ratio=phase1.expert_rank_ratio)
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
    """Phase 1 -> baseline: HTT, low-rank experts and a tied head expanded exactly; AR-SSM layers dropped only with
    drop_ar_ssm=True."""
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
            _assign(getattr(baseline, name).embedding, emb.to_dense())
            report[f"{name}_expanded"] = True
    rank = expert_rank(model.config)
    if rank is not None:
        for old, new in zip(model.blocks, baseline.blocks):
            for name, w in old.bk_layer.moe_ffn.dense_expert_weights().items():
                _assign(getattr(new.bk_layer.moe_ffn, name), w)
        report["experts_expanded"] = {"rank": rank}
    if isinstance(model.lm_head, TiedHTTHead):
        # The tied head's implicit kernel made explicit; _rebuild copied the bias.
        _assign(baseline.lm_head.kernel, model.token_embedding.to_dense().T)
        report["lm_head_untied"] = True
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
