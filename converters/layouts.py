"""Which torch layout a state dict has, and the ModelConfig its tensor shapes describe.

Three layouts are recognised from the keys:

* "baseline"           the reference LanguageModel (REFERENCE_SPEC §1.3);
* "phase1_integrated"  the reference's Phase1IntegratedModel: every key under `base_model.`, HTT cores in
                       place of both embedding tables (§2.12);
* "phase1_jax"         what `export-torch` writes for a Phase 1 model: HTT cores, `blocks.{i}.ar_ssm.*`, low-rank
                       experts (`experts.{k}.{0,3}.a.weight`, `.b.weight`) and a tied head (`lm_head.bias` alone).

The architecture is read off the tensor shapes; what shapes cannot tell (top_k, dropout, ...) comes from
options with the reference's defaults. A tied head has no V x D weight: the vocabulary is the length of
`lm_head.bias` (checked against the HTT cores) and d_model that of `layer_norm_final.weight`. Low-rank experts give
their rank k; the config records it as expert_rank_ratio = k / d_model, which `expert_rank` maps back to k exactly
(a ratio passed as an option must map to the stored k too).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from phase1_jax.config import ModelConfig
from phase1_jax.models.htt import tt_factorization
from phase1_jax.models.resnet_bk import expert_rank
from phase1_jax.phase1_config import Phase1Config

from .state_dict import StateDictMismatchError

LAYOUTS = ("baseline", "phase1_integrated", "phase1_jax")
PREFIXES = {"baseline": "", "phase1_integrated": "base_model.", "phase1_jax": ""}
# Reference defaults for what the shapes cannot tell (REFERENCE_SPEC §1.1).
REFERENCE_DEFAULTS = dict(top_k=1, dropout=0.1, prime_bump_init=False, prime_bump_scale=0.02,
                          scattering_scale=0.1, scattering_scale_warmup_steps=0)


# The factors of a low-rank expert Linear: `.a.weight` is (rank, in), `.b.weight` is (out, rank).
_LOW_RANK_KEY = re.compile(r"\.moe_ffn\.experts\.\d+\.[03]\.([ab])\.weight$")


def detect_layout(state: Mapping[str, np.ndarray]) -> str:
    if any(k.startswith("base_model.") for k in state):
        return "phase1_integrated"
    if "token_embedding.core1" in state or any(".ar_ssm." in k or _LOW_RANK_KEY.search(k) for k in state):
        return "phase1_jax"
    return "baseline"


def default_layout(config: ModelConfig) -> str:
    """The layout `export-torch` writes for a model that was not imported from torch."""
    return "baseline" if config.phase1 is None else "phase1_jax"


def _shape(state: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    if key not in state:
        raise StateDictMismatchError([f"missing key '{key}' (needed to infer the architecture)"])
    return tuple(state[key].shape)


def _vocab_and_width(state: Mapping[str, np.ndarray], p: str) -> tuple[int, int, bool]:
    """(vocab_size, d_model, tied head?)."""
    head, bias, core1, core2 = (f"{p}lm_head.weight", f"{p}lm_head.bias", f"{p}token_embedding.core1",
                                f"{p}token_embedding.core2")
    if head in state or not (bias in state and core1 in state):
        return (*_shape(state, head), False)
    vocab = _shape(state, bias)[0]
    d_model = _shape(state, f"{p}layer_norm_final.weight")[0]
    v1, v2, _, _ = tt_factorization(vocab, d_model)
    cores = (_shape(state, core1)[0], _shape(state, core2)[0])
    if cores != (v1, v2):
        # Otherwise the strict check would blame the cores for what may be a wrong bias.
        raise StateDictMismatchError([f"tied head: '{bias}' has {vocab} entries (the vocabulary), which needs HTT "
                                      f"cores of {v1} and {v2} rows at d_model = {d_model}, but '{core1}' has "
                                      f"{cores[0]} and '{core2}' {cores[1]}"])
    return vocab, d_model, True


def _expert_rank(state: Mapping[str, np.ndarray], p: str) -> tuple[int, str] | None:
    """(rank, a key that has it) of low-rank experts, None for dense ones. The most common rank over every factor
    wins, so that one mis-shaped factor is reported by the strict check rather than every other one."""
    ranks: dict[int, list[str]] = {}
    for key, value in state.items():
        m = _LOW_RANK_KEY.search(key)
        if m and key.startswith(p) and np.ndim(value) == 2:
            ranks.setdefault(int(np.shape(value)[0 if m.group(1) == "a" else 1]), []).append(key)
    if not ranks:
        return None
    rank, keys = max(ranks.items(), key=lambda item: len(item[1]))
    return rank, keys[0]


def infer_model_config(state: Mapping[str, np.ndarray], layout: str, **options: Any) -> ModelConfig:
    """ModelConfig from tensor shapes; `options` supplies what shapes cannot (reference defaults otherwise).

    options: top_k, dropout, prime_bump_init, prime_bump_scale, scattering_scale, scattering_scale_warmup_steps,
    numerics (default "reference"), and for Phase 1 layouts htt_phase_encoding (default True),
    ar_ssm_min_rank (default min(4, max_rank)), ar_ssm_local_conv (default "causal"; "centered" for the
    reference's own AR-SSM layers), expert_rank_ratio (default rank / d_model; must give the stored rank).
    """
    p = PREFIXES[layout]
    vocab, d_model, tied_head = _vocab_and_width(state, p)
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
    low_rank = None  # (rank, key) of low-rank experts
    if layout != "baseline":
        token_htt = f"{p}token_embedding.core1" in state
        ar_layers = sorted({int(m.group(1)) for k in state
                            if (m := re.match(rf"{re.escape(p)}blocks\.(\d+)\.ar_ssm\.", k))})
        phase1: dict[str, Any] = dict(htt_enabled=token_htt, ar_ssm_enabled=bool(ar_layers),
                                      htt_phase_encoding=options.get("htt_phase_encoding", True),
                                      use_gradient_checkpointing=False, checkpoint_ar_ssm=False,
                                      lm_head="htt_tied" if tied_head else "dense")
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
        low_rank = _expert_rank(state, p)
        if low_rank is not None:
            rank, key = low_rank
            if rank >= d_model:
                raise StateDictMismatchError([f"'{key}' has rank {rank}, but low-rank experts need a rank below "
                                              f"d_model = {d_model} (expert_rank_ratio < 1)"])
            ratio = options.get("expert_rank_ratio")
            phase1["expert_rank_ratio"] = rank / d_model if ratio is None else ratio
        fields["phase1"] = Phase1Config(**phase1)
    config = ModelConfig(**fields)
    if low_rank is None and options.get("expert_rank_ratio") is not None:
        raise StateDictMismatchError([f"expert_rank_ratio {options['expert_rank_ratio']} was given, but the "
                                      "state dict holds dense experts"])
    if low_rank is not None and expert_rank(config) != low_rank[0]:
        raise StateDictMismatchError([f"expert_rank_ratio {config.phase1.expert_rank_ratio} gives rank "
                                      f"{expert_rank(config)} at d_model = {d_model}, but '{low_rank[1]}' has "
                                      f"rank {low_rank[0]}"])
    return config
