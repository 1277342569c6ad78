"""Which torch layout a state dict has, and the ModelConfig its tensor shapes describe.

Three layouts are recognised from the keys:

* "baseline"           the reference LanguageModel (REFERENCE_SPEC §1.3);
* "phase1_integrated"  the reference's Phase1IntegratedModel: every key under `base_model.`, HTT cores in
                       place of both embedding tables (§2.12);
* "phase1_jax"         what `export-torch` writes for a Phase 1 model: HTT cores and `blocks.{i}.ar_ssm.*`.

The architecture is read off the tensor shapes; what shapes cannot tell (top_k, dropout, ...) comes from
options with the reference's defaults.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from phase1_jax.config import ModelConfig
from phase1_jax.phase1_config import Phase1Config

from .state_dict import StateDictMismatchError

LAYOUTS = ("baseline", "phase1_integrated", "phase1_jax")
PREFIXES = {"baseline": "", "phase1_integrated": "base_model.", "phase1_jax": ""}
# Reference defaults for what the shapes cannot tell (REFERENCE_SPEC §1.1).
REFERENCE_DEFAULTS = dict(top_k=1, dropout=0.1, prime_bump_init=False, prime_bump_scale=0.02,
                          scattering_scale=0.1, scattering_scale_warmup_steps=0)


def detect_layout(state: Mapping[str, np.ndarray]) -> str:
    if any(k.startswith("base_model.") for k in state):
        return "phase1_integrated"
    if "token_embedding.core1" in state or any(".ar_ssm." in k for k in state):
        return "phase1_jax"
    return "baseline"


def default_layout(config: ModelConfig) -> str:
    """The layout `export-torch` writes for a model that was not imported from torch."""
    return "baseline" if config.phase1 is None else "phase1_jax"


def _shape(state: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    if key not in state:
        raise StateDictMismatchError([f"missing key '{key}' (needed to infer the architecture)"])
    return tuple(state[key].shape)


def infer_model_config(state: Mapping[str, np.ndarray], layout: str, **options: Any) -> ModelConfig:
    """ModelConfig from tensor shapes; `options` supplies what shapes cannot (reference defaults otherwise).

    options: top_k, dropout, prime_bump_init, prime_bump_scale, scattering_scale, scattering_scale_warmup_steps,
    numerics (default "reference"), and for Phase 1 layouts htt_phase_encoding (default True),
    ar_ssm_min_rank (default min(4, max_rank)), ar_ssm_local_conv (default "causal"; "centered" for the
    reference's own AR-SSM layers).
    """
    p = PREFIXES[layout]
    vocab, d_model = _shape(state, f"{p}lm_head.weight")
    n_seq = _shape(state, f"{p}blocks.0.bk_layer.h0_diag_base")[1]
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(p)}blocks\.(\d+)\.", k))}
    num_experts = _shape(state, f"{p}blocks.0.bk_layer.moe_ffn.gating_network.weight")[0]
    model_opts = {k: options.get(k, v) for k, v in REFERENCE_DEFAULTS.items()}
    fields: dict[str, Any] = dict(vocab_size=vocab, d_model=d_model, n_layers=max(layer_ids) + 1, n_seq=n_seq,
                                  num_experts=num_experts, numerics=options.get("numerics", "reference"),
                                  **model_opts)
    floats = {str(v.dtype) for v in state.values() if v.dtype.kind == "f" or str(v.dtype) == "bfloat16"}
    if floats - {"float32", "bfloat16"}:
        raise StateDictMismatchError([f"floating dtypes {sorted(floats)}: phase1-jax imports float32 or bfloat16 "
                                      "checkpoints (convert with model.float() or model.bfloat16() first)"])
    fields["param_dtype"] = "bfloat16" if floats == {"bfloat16"} else "float32"
    if layout != "baseline":
        token_htt = f"{p}token_embedding.core1" in state
        ar_layers = sorted({int(m.group(1)) for k in state
                            if (m := re.match(rf"{re.escape(p)}blocks\.(\d+)\.ar_ssm\.", k))})
        phase1: dict[str, Any] = dict(htt_enabled=token_htt, ar_ssm_enabled=bool(ar_layers),
                                      htt_phase_encoding=options.get("htt_phase_encoding", True),
                                      use_gradient_checkpointing=False, checkpoint_ar_ssm=False)
        if token_htt:
            phase1["htt_rank"] = _shape(state, f"{p}token_embedding.core1")[2]
            phase1["htt_position_embedding"] = f"{p}position_embedding.core1" in state
        if ar_layers:
            first = f"{p}blocks.{ar_layers[0]}.ar_ssm"
            max_rank = _shape(state, f"{first}.U_proj.weight")[0]
            min_rank = options.get("ar_ssm_min_rank") or min(4, max_rank)
            phase1.update(ar_ssm_max_rank=max_rank, ar_ssm_min_rank=min_rank,
                          ar_ssm_gate_hidden_dim=_shape(state, f"{first}.complexity_gate.0.weight")[0],
                          ar_ssm_layers=tuple(ar_layers),
                          ar_ssm_local_conv=options.get("ar_ssm_local_conv", "causal"))
        fields["phase1"] = Phase1Config(**phase1)
    return ModelConfig(**fields)
