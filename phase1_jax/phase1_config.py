"""Phase 1 configuration: a frozen, validated dataclass plus named presets.

Field names and defaults follow the PyTorch reference's `Phase1Config` (REFERENCE_SPEC §2.9, §2.10) so that configs
written for it load here; five fields of ours are appended at the end. Differences from the reference, on purpose:

* the object is frozen (`replace` returns a validated copy) and presets are handed out as fresh objects, where the
  reference shares one mutable instance per preset;
* validation happens on construction and raises `InvalidConfigError` naming the first offending field, its value
  and what is allowed; it is stricter (types are checked, `htt_num_cores` must be exactly 2 because the HTT
  embedding supports nothing else, and `lns_use_max_log` must agree with our `lns_algorithm`);
* `from_dict` rejects unknown keys instead of failing inside the constructor with a TypeError.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from .errors import InvalidConfigError

__all__ = [
    "Phase1Config",
    "PRESETS",
    "field_names",
    "get_preset_config",
    "list_presets",
]

_LOCAL_CONV_MODES = ("causal", "centered")
_LNS_ALGORITHMS = ("max_log", "exact")
LM_HEADS = ("dense", "htt_tied")


@dataclasses.dataclass(frozen=True)
class Phase1Config:
    """Settings of the Phase 1 components (AR-SSM, HTT embedding, LNS linear, stability monitoring).

    There are no model-shape fields (vocab size, width, depth): those belong to the model config.
    `ar_ssm_gate_hidden_dim=None` means "derive from the model width": D // 4, raised to at least
    `ar_ssm_min_rank` (what the reference's layer does).
    """

    # AR-SSM
    ar_ssm_enabled: bool = True
    ar_ssm_max_rank: int = 32
    ar_ssm_min_rank: int = 4
    ar_ssm_gate_hidden_dim: int | None = None
    ar_ssm_l1_regularization: float = 0.001
    ar_ssm_use_fused_scan: bool = True
    # HTT embedding
    htt_enabled: bool = True
    htt_rank: int = 16
    htt_num_cores: int = 2
    htt_phase_encoding: bool = True
    htt_compression_target: float = 0.1
    # LNS (inference-only)
    lns_enabled: bool = False
    lns_block_size_m: int = 128
    lns_block_size_n: int = 128
    lns_block_size_k: int = 32
    lns_use_max_log: bool = True
    # Stability monitoring
    stability_monitoring_enabled: bool = True
    stability_threshold: float = 1e-6
    schatten_s1_bound: float = 100.0
    schatten_s2_bound: float = 50.0
    gradient_norm_threshold: float = 10.0
    # Memory
    use_gradient_checkpointing: bool = True
    checkpoint_ar_ssm: bool = True
    checkpoint_htt: bool = False
    # Targets
    target_vram_gb: float = 8.0
    target_ppl_degradation: float = 0.05
    target_speedup: float = 3.0
    # --- ours (not in the reference) ---
    ar_ssm_layers: tuple[int, ...] | None = None  # block indices that get an AR-SSM sub-layer; None = all
    ar_ssm_local_conv: str = "causal"  # "causal" (ours, no future leak) | "centered" (the reference's padding)
    ar_ssm_rank_warmup_steps: int = 1000
    htt_position_embedding: bool = False  # also factorise the position table (the reference's factory does)
    lns_algorithm: str = "max_log"  # "max_log" | "exact"
    # "dense": the reference's V x D LM head. "htt_tied": logits from the HTT token embedding's cores (weight tying,
    # no V x D matrix anywhere) plus a V-sized bias; needs htt_enabled.
    lm_head: str = "dense"
    # None: dense experts (d -> 2d -> d). A ratio rho: each expert matrix W (m x n) is a product of two factors
    # through rank round(rho * d_model), which divides the experts' parameters and FLOPs alike.
    expert_rank_ratio: float | None = None
    # Recompute each expert's hidden layer (T x E x 2d, the widest activation) in the backward pass instead of
    # storing it: half of block rematerialisation's memory saving for a sixth of its cost (H200, PHASE1.md run 3).
    checkpoint_expert_hidden: bool = False

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            kind = _FIELD_KINDS[f.name]
            value = getattr(self, f.name)
            checked = _CHECKERS[kind](f.name, value)
            if checked is not value:
                # Normalise (int -> float, list -> tuple, numpy scalars -> Python) so that equality,
                # hashing and YAML output do not depend on how a value was spelled.
                object.__setattr__(self, f.name, checked)
        self._check_ranges()

    def _check_ranges(self) -> None:
        def fail(name: str, reason: str) -> None:
            raise InvalidConfigError(name, getattr(self, name), reason)

        if self.ar_ssm_min_rank < 1:
            fail("ar_ssm_min_rank", "must be >= 1")
        if self.ar_ssm_max_rank < self.ar_ssm_min_rank:
            fail("ar_ssm_max_rank", f"must be >= ar_ssm_min_rank ({self.ar_ssm_min_rank})")
        if self.ar_ssm_gate_hidden_dim is not None and self.ar_ssm_gate_hidden_dim < 1:
            fail("ar_ssm_gate_hidden_dim", "must be None (derive from d_model) or an int >= 1")
        if self.ar_ssm_l1_regularization < 0:
            fail("ar_ssm_l1_regularization", "must be >= 0")
        if self.ar_ssm_layers is not None:
            if any(i < 0 for i in self.ar_ssm_layers):
                fail("ar_ssm_layers", "block indices must be >= 0")
            if len(set(self.ar_ssm_layers)) != len(self.ar_ssm_layers):
                fail("ar_ssm_layers", "block indices must be unique")
        if self.ar_ssm_local_conv not in _LOCAL_CONV_MODES:
            fail("ar_ssm_local_conv", f"must be one of {_LOCAL_CONV_MODES}")
        if self.ar_ssm_rank_warmup_steps < 0:
            fail("ar_ssm_rank_warmup_steps", "must be >= 0 (0 = no rank warm-up)")

        if self.htt_rank < 1:
            fail("htt_rank", "must be >= 1")
        if self.htt_num_cores != 2:
            fail("htt_num_cores", "must be exactly 2 (the only factorisation HolographicTTEmbedding supports)")
        if not 0.0 < self.htt_compression_target < 1.0:
            fail("htt_compression_target", "must lie strictly between 0 and 1")

        for name in ("lns_block_size_m", "lns_block_size_n", "lns_block_size_k"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        if self.lns_algorithm not in _LNS_ALGORITHMS:
            fail("lns_algorithm", f"must be one of {_LNS_ALGORITHMS}")
        # The reference's flag and our enum say the same thing twice; refuse a silent disagreement.
        if self.lns_use_max_log != (self.lns_algorithm == "max_log"):
            fail("lns_use_max_log",
                 f"conflicts with lns_algorithm={self.lns_algorithm!r}; set lns_use_max_log="
                 f"{self.lns_algorithm == 'max_log'} together with lns_algorithm")

        if self.lm_head not in LM_HEADS:
            fail("lm_head", f"must be one of {LM_HEADS}")
        if self.lm_head == "htt_tied" and not self.htt_enabled:
            fail("lm_head", "'htt_tied' ties the head to the HTT token embedding: set htt_enabled=True or use 'dense'")
        if self.lm_head == "htt_tied" and self.lns_enabled:
            fail("lm_head", "'htt_tied' has no dense kernel for LNS to take over: use lm_head='dense' with lns_enabled")
        if self.expert_rank_ratio is not None and not 0.0 < self.expert_rank_ratio < 1.0:
            fail("expert_rank_ratio", "must be None (dense experts) or strictly between 0 and 1")

        for name in ("stability_threshold", "schatten_s1_bound", "schatten_s2_bound", "gradient_norm_threshold",
                     "target_vram_gb", "target_ppl_degradation", "target_speedup"):
            if not getattr(self, name) > 0:
                fail(name, "must be > 0")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict (tuples become lists) in field order."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Phase1Config":
        """Build from a mapping (e.g. parsed YAML); missing keys take defaults, unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise InvalidConfigError("Phase1Config", d, "from_dict expects a mapping of field names to values")
        allowed = field_names()
        unknown = sorted(str(k) for k in d if k not in allowed)
        if unknown:
            raise InvalidConfigError(", ".join(unknown), {k: d[k] for k in d if str(k) in unknown},
                                     f"unknown Phase1Config field(s); allowed names: {', '.join(allowed)}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> "Phase1Config":
        """A validated copy with some fields changed."""
        allowed = field_names()
        unknown = sorted(k for k in changes if k not in allowed)
        if unknown:
            raise InvalidConfigError(", ".join(unknown), {k: changes[k] for k in unknown},
                                     f"unknown Phase1Config field(s); allowed names: {', '.join(allowed)}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ constructors of the reference
    @classmethod
    def for_hardware(cls, vram_gb: float) -> "Phase1Config":
        """The reference's three hardware tiers: <= 8 GB, <= 10 GB, larger (§2.10).

        Unlike the "8gb" preset, the <= 8 GB tier keeps the default L1 of 0.001 (as the reference does).
        """
        if isinstance(vram_gb, bool) or not isinstance(vram_gb, numbers.Real) or not math.isfinite(vram_gb) \
                or vram_gb <= 0:
            raise InvalidConfigError("vram_gb", vram_gb, "must be a finite number > 0")
        if vram_gb <= 8:
            return cls(ar_ssm_max_rank=16, ar_ssm_min_rank=4, htt_rank=8, htt_compression_target=0.05,
                       use_gradient_checkpointing=True, checkpoint_ar_ssm=True, target_vram_gb=8.0)
        if vram_gb <= 10:
            return cls(ar_ssm_max_rank=32, ar_ssm_min_rank=4, htt_rank=16, htt_compression_target=0.1,
                       use_gradient_checkpointing=True, checkpoint_ar_ssm=True, target_vram_gb=10.0)
        return cls(ar_ssm_max_rank=64, ar_ssm_min_rank=8, htt_rank=32, htt_compression_target=0.2,
                   use_gradient_checkpointing=False, checkpoint_ar_ssm=False, target_vram_gb=24.0)

    @classmethod
    def for_inference(cls) -> "Phase1Config":
        """Defaults with LNS on and all checkpointing off (target_speedup stays 3, unlike the "inference" preset)."""
        return cls(lns_enabled=True, use_gradient_checkpointing=False, checkpoint_ar_ssm=False,
                   checkpoint_htt=False)

    @classmethod
    def for_maximum_quality(cls) -> "Phase1Config":
        """Large ranks and a 1 % perplexity budget; keeps the default checkpointing and 8 GB target."""
        return cls(ar_ssm_max_rank=128, ar_ssm_min_rank=16, htt_rank=64, htt_compression_target=0.3,
                   ar_ssm_l1_regularization=0.0001, target_ppl_degradation=0.01)

    @classmethod
    def for_maximum_efficiency(cls) -> "Phase1Config":
        """Small ranks, strong gate sparsity and a 6 GB target."""
        return cls(ar_ssm_max_rank=16, ar_ssm_min_rank=2, htt_rank=8, htt_compression_target=0.05,
                   ar_ssm_l1_regularization=0.01, use_gradient_checkpointing=True, checkpoint_ar_ssm=True,
                   target_vram_gb=6.0)


# ---------------------------------------------------------------------- type checking helpers
def _check_bool(name: str, value: Any) -> bool:
    # numpy bools are accepted (they come out of array code); ints are not: 1 for True is too often a typo.
    if isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise InvalidConfigError(name, value, "must be a bool (True or False)")


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidConfigError(name, value, "must be an int (bools and floats are not accepted)")
    return value if type(value) is int else int(value)


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-6, without a dot, as a string
        try:
            value = float(value)
        except ValueError:
            raise InvalidConfigError(name, value, "must be a real number") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidConfigError(name, value, "must be a real number")
    if not math.isfinite(value):
        raise InvalidConfigError(name, value, "must be finite")
    return value if type(value) is float else float(value)


def _check_optional_int(name: str, value: Any) -> int | None:
    return None if value is None else _check_int(name, value)


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidConfigError(name, value, "must be a string")
    return value


def _check_optional_float(name: str, value: Any) -> float | None:
    return None if value is None else _check_float(name, value)


def _check_layers(name: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise InvalidConfigError(name, value, "must be None (all blocks) or a list/tuple of block indices")
    return tuple(_check_int(name, v) for v in value)


_CHECKERS = {
    "bool": _check_bool,
    "int": _check_int,
    "float": _check_float,
    "optional_int": _check_optional_int,
    "optional_float": _check_optional_float,
    "str": _check_str,
    "layers": _check_layers,
}

_FIELD_KINDS: Mapping[str, str] = MappingProxyType({
    "ar_ssm_enabled": "bool",
    "ar_ssm_max_rank": "int",
    "ar_ssm_min_rank": "int",
    "ar_ssm_gate_hidden_dim": "optional_int",
    "ar_ssm_l1_regularization": "float",
    "ar_ssm_use_fused_scan": "bool",
    "htt_enabled": "bool",
    "htt_rank": "int",
    "htt_num_cores": "int",
    "htt_phase_encoding": "bool",
    "htt_compression_target": "float",
    "lns_enabled": "bool",
    "lns_block_size_m": "int",
    "lns_block_size_n": "int",
    "lns_block_size_k": "int",
    "lns_use_max_log": "bool",
    "stability_monitoring_enabled": "bool",
    "stability_threshold": "float",
    "schatten_s1_bound": "float",
    "schatten_s2_bound": "float",
    "gradient_norm_threshold": "float",
    "use_gradient_checkpointing": "bool",
    "checkpoint_ar_ssm": "bool",
    "checkpoint_htt": "bool",
    "target_vram_gb": "float",
    "target_ppl_degradation": "float",
    "target_speedup": "float",
    "ar_ssm_layers": "layers",
    "ar_ssm_local_conv": "str",
    "ar_ssm_rank_warmup_steps": "int",
    "htt_position_embedding": "bool",
    "lns_algorithm": "str",
    "lm_head": "str",
    "expert_rank_ratio": "optional_float",
    "checkpoint_expert_hidden": "bool",
})

assert tuple(_FIELD_KINDS) == tuple(f.name for f in dataclasses.fields(Phase1Config)), "field table out of date"


def field_names() -> tuple[str, ...]:
    """The config's field names, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(Phase1Config))


# ---------------------------------------------------------------------- presets (§2.10)
def _preset(description: str, **overrides: Any) -> tuple[str, Phase1Config]:
    return description, Phase1Config(**overrides)


_PRESET_TABLE = {
    # The memory presets (8gb, 10gb, max_efficiency) differ from the reference's table (§2.10) on purpose: the HTT
    # head tied to the embedding (the V x D head is the largest matrix left otherwise), and for 8gb and
    # max_efficiency low-rank experts; 8gb recomputes only the experts' hidden layers instead of whole blocks:
    # on the H200 (docs/perf/PHASE1.md, run 3) block remat made the §6.2-shape step 12 % slower, this 2 %.
    "8gb": _preset(
        "8 GB cards (e.g. RTX 3080 Mobile): maximum compression (tied HTT head, low-rank experts), experts' "
        "hidden layers recomputed",
        ar_ssm_max_rank=16, ar_ssm_min_rank=4, ar_ssm_l1_regularization=0.01, htt_rank=8,
        htt_compression_target=0.05, use_gradient_checkpointing=False, checkpoint_ar_ssm=True,
        target_vram_gb=8.0, target_ppl_degradation=0.05, lm_head="htt_tied", expert_rank_ratio=0.25,
        checkpoint_expert_hidden=True),
    "10gb": _preset(
        "10 GB cards (e.g. RTX 3080): balanced compression (tied HTT head), checkpointing on",
        ar_ssm_max_rank=32, ar_ssm_min_rank=4, ar_ssm_l1_regularization=0.001, htt_rank=16,
        htt_compression_target=0.1, use_gradient_checkpointing=True, checkpoint_ar_ssm=True,
        target_vram_gb=10.0, target_ppl_degradation=0.05, lm_head="htt_tied"),
    "24gb": _preset(
        "24 GB cards (e.g. RTX 4090): quality first, no checkpointing",
        ar_ssm_max_rank=64, ar_ssm_min_rank=8, ar_ssm_l1_regularization=0.0001, htt_rank=32,
        htt_compression_target=0.2, use_gradient_checkpointing=False, checkpoint_ar_ssm=False,
        target_vram_gb=24.0, target_ppl_degradation=0.01),
    "inference": _preset(
        "Inference: LNS enabled, no checkpointing, 5x speed-up target",
        ar_ssm_max_rank=32, ar_ssm_min_rank=4, ar_ssm_l1_regularization=0.001, htt_rank=16,
        htt_compression_target=0.1, lns_enabled=True, use_gradient_checkpointing=False, checkpoint_ar_ssm=False,
        target_vram_gb=8.0, target_ppl_degradation=0.05, target_speedup=5.0),
    "max_quality": _preset(
        "Maximum quality: large ranks, 40 GB target, 1% perplexity budget",
        ar_ssm_max_rank=128, ar_ssm_min_rank=16, ar_ssm_l1_regularization=0.0001, htt_rank=64,
        htt_compression_target=0.3, use_gradient_checkpointing=False, checkpoint_ar_ssm=False,
        target_vram_gb=40.0, target_ppl_degradation=0.01),
    "max_efficiency": _preset(
        "Maximum efficiency: smallest ranks, strong sparsity, tied HTT head, rank d/8 experts, 6 GB target",
        ar_ssm_max_rank=16, ar_ssm_min_rank=2, ar_ssm_l1_regularization=0.01, htt_rank=8,
        htt_compression_target=0.05, use_gradient_checkpointing=True, checkpoint_ar_ssm=True,
        target_vram_gb=6.0, target_ppl_degradation=0.10, lm_head="htt_tied", expert_rank_ratio=0.125),
}

#: Preset name -> frozen Phase1Config. Read-only; `get_preset_config` hands out copies.
PRESETS: Mapping[str, Phase1Config] = MappingProxyType({k: cfg for k, (_, cfg) in _PRESET_TABLE.items()})
_DESCRIPTIONS: Mapping[str, str] = MappingProxyType({k: desc for k, (desc, _) in _PRESET_TABLE.items()})


def get_preset_config(name: str) -> Phase1Config:
    """A fresh Phase1Config for a named preset (never a shared instance, unlike the reference)."""
    try:
        cfg = PRESETS[name]
    except (KeyError, TypeError):
        raise InvalidConfigError("preset", name, f"unknown preset; available presets: {', '.join(PRESETS)}") from None
    return dataclasses.replace(cfg)


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description (a new dict each call)."""
    return dict(_DESCRIPTIONS)
