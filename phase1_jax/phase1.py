"""The Phase 1 API of the migration guide: create_phase1_model and collect_phase1_diagnostics.

Unlike the PyTorch reference's factory (which only swaps the embeddings, REFERENCE_SPEC §2.12), the model built
here really contains its parts: an HTT token embedding, an AR-SSM mixing sub-layer in every configured block,
and an LNS LM head for inference when enabled.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig
from .models.ar_ssm import AdaptiveRankSemiseparableLayer
from .models.htt import HolographicTTEmbedding
from .models.resnet_bk import ResNetBK
from .phase1_config import Phase1Config, get_preset_config
from .stability import BKStabilityMonitor, causal_resolvent_diagonal, stability_metrics


def create_phase1_model(config: ModelConfig | None = None, *, phase1: Phase1Config | str | None = None,
                        seed: int = 0, **model_fields: Any) -> ResNetBK:
    """A Phase 1 ResNet-BK.

    create_phase1_model(ModelConfig(..., phase1=Phase1Config(...)))
    create_phase1_model(vocab_size=50257, d_model=512, n_layers=8, n_seq=1024, phase1="8gb")
    """
    if isinstance(phase1, str):
        phase1 = get_preset_config(phase1)
    if config is None:
        config = ModelConfig(**model_fields, phase1=phase1 or Phase1Config())
    else:
        if model_fields:
            config = config.replace(**model_fields)
        if phase1 is not None or config.phase1 is None:
            config = config.replace(phase1=phase1 or Phase1Config())
    return ResNetBK(config, rngs=nnx.Rngs(params=seed))


def phase1_components(model: ResNetBK) -> dict[str, Any]:
    """Counts what the model really contains (HTT embeddings, AR-SSM layers by block, LNS layers)."""
    from .models.lns import LNSLinear

    modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
    return {
        "htt_embeddings": sum(isinstance(m, HolographicTTEmbedding) for m in modules),
        "ar_ssm_layers": sum(isinstance(m, AdaptiveRankSemiseparableLayer) for m in modules),
        "ar_ssm_blocks": [i for i, b in enumerate(model.blocks) if b.ar_ssm is not None],
        "lns_layers": sum(isinstance(m, LNSLinear) for m in modules),
    }


def parameter_breakdown(model: ResNetBK) -> dict[str, int]:
    """Where the parameters are: token_embedding, position_embedding, lm_head, blocks (with their AR-SSM layers
    and experts), final_norm, embeddings_and_head (the first three together) and total."""
    params = nnx.state(model, nnx.Param)

    def count(tree) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))

    top = {name: count(params[name]) if name in params else 0
           for name in ("token_embedding", "position_embedding", "lm_head", "blocks", "layer_norm_final")}
    out = {"token_embedding": top["token_embedding"], "position_embedding": top["position_embedding"],
           "lm_head": top["lm_head"], "blocks": top["blocks"], "final_norm": top["layer_norm_final"]}
    out["blocks_ar_ssm"] = sum(count(params["blocks"][i][name]) for i, b in enumerate(model.blocks)
                               if b.ar_ssm is not None for name in ("ar_ssm", "ar_ssm_norm"))
    out["blocks_experts"] = sum(count(params["blocks"][i]["bk_layer"]["moe_ffn"]) for i in range(len(model.blocks)))
    out["embeddings_and_head"] = out["token_embedding"] + out["position_embedding"] + out["lm_head"]
    out["total"] = count(params)
    return out


def stability_summary(aux: dict[str, Any], direction: str, epsilon: float = 1.0) -> dict[str, jax.Array]:
    """Worst-block stability metrics from a forward's aux (jit-able; no host sync).

    The blocks are stacked and their metrics computed together (`jax.vmap`), so the step runs one set of
    reductions for all blocks instead of one per block. Causal BK features are the causal diagonals g_t
    themselves, which gives log|det| for free; other directions get them from the BK op, all blocks at once.
    """
    feats = jnp.stack([block["bk_features"] for block in aux["blocks"]])  # (blocks, B, N, 2)
    potential = jnp.stack([block["potential"] for block in aux["blocks"]])  # (blocks, B, N)
    g = jax.lax.complex(feats[..., 0], feats[..., 1])
    g_causal = g if direction == "causal" else causal_resolvent_diagonal(potential)
    per_block = jax.vmap(lambda gi, vi, ci: stability_metrics(gi, vi, epsilon, g_causal=ci))(g, potential, g_causal)
    worst = {"log_det_per_token": jnp.min, "g_abs_max": jnp.max, "g_abs_min": jnp.min,
             "fraction_zero_rows": jnp.max, "schatten_s1_per_token": jnp.max, "schatten_s2_per_token": jnp.max}
    return {f"stability/{k}": fn(per_block[k]) for k, fn in worst.items()}


def collect_phase1_diagnostics(model: ResNetBK, ids: jax.Array | np.ndarray, *,
                               dense_embedding: np.ndarray | None = None, epsilon: float = 1.0) -> dict[str, Any]:
    """AR-SSM effective rank and gate sparsity, HTT compression (and reconstruction error against a known dense
    table), peak device memory where the backend reports it, and a stability summary with warnings."""
    ids = jnp.asarray(ids, jnp.int32)
    logits, aux = nnx.jit(lambda m, x: m.forward(x))(model, ids)
    out: dict[str, Any] = {"components": phase1_components(model), "parameters": parameter_breakdown(model)}
    ranks = [float(b["ar_ssm_effective_rank"]) for b in aux["blocks"] if "ar_ssm_effective_rank" in b]
    sparsity = [float(b["ar_ssm_gate_sparsity"]) for b in aux["blocks"] if "ar_ssm_gate_sparsity" in b]
    out["ar_ssm_effective_rank"] = float(np.mean(ranks)) if ranks else None
    out["ar_ssm_gate_sparsity"] = float(np.mean(sparsity)) if sparsity else None
    emb = model.token_embedding
    if isinstance(emb, HolographicTTEmbedding):
        out["htt_compression_ratio"] = emb.compression_ratio()
        if dense_embedding is not None:
            dense = np.asarray(dense_embedding, np.float64)
            approx = np.asarray(emb.to_dense(), np.float64)
            out["htt_reconstruction_error"] = float(np.linalg.norm(approx - dense) / np.linalg.norm(dense))
    else:
        out["htt_compression_ratio"] = None
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    out["peak_memory_bytes"] = (stats or {}).get("peak_bytes_in_use")
    summary = {k: float(v) for k, v in stability_summary(aux, model.config.bk_direction, epsilon).items()}
    monitor = BKStabilityMonitor(mode="normalized")
    g = [jax.lax.complex(b["bk_features"][..., 0], b["bk_features"][..., 1]) for b in aux["blocks"]]
    checks = [monitor.check_stability(np.asarray(gi), np.asarray(b["potential"]), epsilon,
                                      g_causal=np.asarray(gi) if model.config.bk_direction == "causal" else None)
              for gi, b in zip(g, aux["blocks"])]
    out["stability"] = dict(summary, is_stable=all(c.is_stable for c in checks),
                            warnings=[w for c in checks for w in c.warnings])
    out["logits_finite"] = bool(np.isfinite(np.asarray(logits)).all())
    return out
