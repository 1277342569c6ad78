"""Typed, frozen, validated configuration: model, training, data, and the run that ties them together.

YAML layout (the migration guide's §4.1 shape)::

    model:
      vocab_size: 256
      d_model: 64
      ...
      numerics: native          # or: reference
      phase1:                   # absent or null: the ResNet-BK baseline
        htt_rank: 16
        ...
    training:
      batch_size: 16
      ...
    data:
      source: embedded

Every field is checked when the object is built; an error names the field, the value and what is allowed
(`InvalidConfigError`). Unknown keys are rejected, never ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

import yaml

from .errors import InvalidConfigError
from .phase1_config import Phase1Config

NUMERICS = ("reference", "native")
BK_DIRECTIONS = ("causal", "bidirectional")
COMPUTE_DTYPES = ("float32", "bfloat16")
PARAM_DTYPES = ("float32", "bfloat16")
DATA_SOURCES = ("embedded", "text", "tokens")
TOKEN_DTYPES = ("uint16", "uint32")
TOKENIZER_KINDS = ("byte", "bpe")
# A BPE vocabulary is the 256-byte alphabet plus at least one merge; the ceiling (2**18) is above any
# vocabulary in use and keeps a typo from sizing an embedding table by millions of rows.
BPE_VOCAB_RANGE = (257, 262_144)
OPTIMIZERS = ("adamw", "torch_adamw", "torch_adam")
REMAT_MODES = ("model", "none", "blocks")


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise InvalidConfigError(field, value, f"allowed: {allowed}")


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _check_types(obj: Any, prefix: str) -> None:
    """Checks each field against its annotation (int, float, bool, str, Optional[...]); no silent coercion."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        expected = hints[f.name]
        optional = False
        if isinstance(expected, types.UnionType) or typing.get_origin(expected) is typing.Union:
            args = [a for a in typing.get_args(expected) if a is not type(None)]
            optional = len(args) < len(typing.get_args(expected))
            expected = args[0] if len(args) == 1 else expected
        name = f"{prefix}{f.name}"
        if value is None:
            _require(optional, name, value, f"a value of type {getattr(expected, '__name__', expected)}")
        elif expected is bool:
            _require(isinstance(value, bool), name, value, "true or false")
        elif expected is int:
            _require(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
        elif expected is float:
            # Integers are fine where a float is expected, and so is "1e-3": PyYAML (YAML 1.1) reads exponent
            # notation without a dot as a string.
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(obj, f.name, float(value))
            elif isinstance(value, str) and _as_float(value) is not None:
                object.__setattr__(obj, f.name, _as_float(value))
            else:
                _require(isinstance(value, float), name, value, "a number")
        elif expected is str:
            _require(isinstance(value, str), name, value, "a string")


def _from_mapping(cls, data: Mapping[str, Any] | None, section: str):
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidConfigError(f"{section}.{unknown[0]}", data[unknown[0]],
                                 f"unknown key(s) {unknown}; allowed keys: {sorted(names)}")
    return cls(**data)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The ResNet-BK language model (and, with `phase1`, its Phase 1 variant).

    numerics:
      * "reference": reproduces the PyTorch reference exactly (non-causal BK-Core with its overflow cliff and
        heuristic gradient, the inert scattering term); input length must equal n_seq.
      * "native": causal BK-Core (or bidirectional, see bk_direction), exact gradients, stable at any length,
        any input length 1..n_seq.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4
    n_seq: int = 128
    num_experts: int = 4
    top_k: int = 1
    dropout: float = 0.1
    prime_bump_init: bool = False
    prime_bump_scale: float = 0.02
    scattering_scale: float = 0.1
    scattering_scale_warmup_steps: int = 0
    numerics: str = "native"
    bk_direction: str = "causal"
    param_dtype: str = "float32"
    phase1: Phase1Config | None = None

    def __post_init__(self):
        if isinstance(self.phase1, Mapping):
            object.__setattr__(self, "phase1", Phase1Config.from_dict(dict(self.phase1)))
        _check_types(self, "model.")
        for name in ("vocab_size", "d_model", "n_layers", "n_seq", "num_experts", "top_k"):
            _require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "an integer >= 1")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "0 <= dropout < 1")
        _require(self.prime_bump_scale >= 0, "model.prime_bump_scale", self.prime_bump_scale, ">= 0")
        _require(self.scattering_scale >= 0, "model.scattering_scale", self.scattering_scale, ">= 0")
        _require(self.scattering_scale_warmup_steps >= 0, "model.scattering_scale_warmup_steps",
                 self.scattering_scale_warmup_steps, ">= 0")
        _require(self.numerics in NUMERICS, "model.numerics", self.numerics, " | ".join(NUMERICS))
        _require(self.bk_direction in BK_DIRECTIONS, "model.bk_direction", self.bk_direction,
                 " | ".join(BK_DIRECTIONS))
        _require(not (self.numerics == "reference" and self.bk_direction != "causal"), "model.bk_direction",
                 self.bk_direction, "'causal' (the default) with numerics: reference, whose BK-Core is the "
                 "reference's own full-matrix resolvent; choose numerics: native for the bidirectional variant")
        _require(self.param_dtype in PARAM_DTYPES, "model.param_dtype", self.param_dtype, " | ".join(PARAM_DTYPES))
        _require(self.phase1 is None or isinstance(self.phase1, Phase1Config), "model.phase1", self.phase1,
                 "a phase1 block (mapping) or null")

    @property
    def is_phase1(self) -> bool:
        return self.phase1 is not None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["phase1"] = None if self.phase1 is None else self.phase1.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "ModelConfig":
        return _from_mapping(cls, data, "model")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW with linear warmup and cosine decay, global-norm clipping (grad_clip_norm: null for none).

    optimizer:
      * "adamw": optax's AdamW.
      * "torch_adamw" / "torch_adam": torch.optim.AdamW / Adam bit for bit (phase1_jax.torch_optim), with torch's
        clip_grad_norm_ formula; for reference-numerics models that must follow a PyTorch training run. Weight
        decay then applies to every parameter, as torch applies it to `model.parameters()` (optax's adamw decays
        matrices only).
    """

    batch_size: int = 16
    steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float | None = 1.0
    optimizer: str = "adamw"
    compute_dtype: str = "float32"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    # Cross-entropy over chunks of this many tokens, each chunk's logits recomputed in the backward pass, so the
    # (tokens x vocab) float32 logits and their gradient never exist whole; None = the whole batch at once.
    loss_chunk_tokens: int | None = None
    # Memory plan: per-block rematerialisation ("model" = what the model config says) and gradient accumulation
    # over micro_batches equal slices of the batch (same effective batch, same mathematics).
    remat: str = "model"
    micro_batches: int = 1
    # Whole-state checkpoints (run/checkpoints/<step>/): every N steps and/or every M minutes (null = never), the
    # newest keep_checkpoints kept; one more at the end and on SIGTERM/SIGINT.
    checkpoint_every: int | None = 250
    checkpoint_every_minutes: float | None = None
    keep_checkpoints: int = 3
    # Recovery. A step whose loss or gradients are not finite, or whose loss is spike_sigma standard deviations
    # above the mean of the last spike_window accepted losses (null: no spike test), is skipped inside the step.
    # After max_consecutive_skips skips in a row: restore the last good checkpoint, multiply the learning rate by
    # recovery_lr_factor, skip the offending batches; give up after max_restores restorations.
    spike_sigma: float | None = 6.0
    spike_window: int = 64
    max_consecutive_skips: int = 3
    recovery_lr_factor: float = 0.5
    max_restores: int = 3
    tensorboard: bool = True

    def __post_init__(self):
        _check_types(self, "training.")
        for name in ("batch_size", "steps", "log_every", "eval_every", "eval_batches"):
            _require(getattr(self, name) >= 1, f"training.{name}", getattr(self, name), "an integer >= 1")
        _require(self.learning_rate > 0, "training.learning_rate", self.learning_rate, "> 0")
        _require(0 <= self.warmup_steps, "training.warmup_steps", self.warmup_steps, ">= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "training.min_lr_ratio", self.min_lr_ratio, "0 <= x <= 1")
        _require(self.weight_decay >= 0, "training.weight_decay", self.weight_decay, ">= 0")
        _require(0 <= self.beta1 < 1, "training.beta1", self.beta1, "0 <= beta1 < 1")
        _require(0 <= self.beta2 < 1, "training.beta2", self.beta2, "0 <= beta2 < 1")
        _require(self.eps > 0, "training.eps", self.eps, "> 0")
        _require(self.grad_clip_norm is None or self.grad_clip_norm > 0, "training.grad_clip_norm",
                 self.grad_clip_norm, "> 0, or null for no clipping")
        _require(self.optimizer in OPTIMIZERS, "training.optimizer", self.optimizer, " | ".join(OPTIMIZERS))
        _require(self.compute_dtype in COMPUTE_DTYPES, "training.compute_dtype", self.compute_dtype,
                 " | ".join(COMPUTE_DTYPES))
        _require(self.loss_chunk_tokens is None or self.loss_chunk_tokens >= 1, "training.loss_chunk_tokens",
                 self.loss_chunk_tokens, "null (whole batch) or an integer >= 1")
        _require(self.remat in REMAT_MODES, "training.remat", self.remat, " | ".join(REMAT_MODES))
        _require(self.micro_batches >= 1 and self.batch_size % self.micro_batches == 0, "training.micro_batches",
                 self.micro_batches, f"an integer >= 1 that divides training.batch_size ({self.batch_size})")
        _require(self.checkpoint_every is None or self.checkpoint_every >= 1, "training.checkpoint_every",
                 self.checkpoint_every, "null (never) or an integer >= 1")
        _require(self.checkpoint_every_minutes is None or self.checkpoint_every_minutes > 0,
                 "training.checkpoint_every_minutes", self.checkpoint_every_minutes, "null (never) or > 0")
        _require(self.keep_checkpoints >= 1, "training.keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        _require(self.spike_sigma is None or self.spike_sigma > 0, "training.spike_sigma", self.spike_sigma,
                 "null (no spike test) or > 0")
        _require(self.spike_window >= 2, "training.spike_window", self.spike_window, "an integer >= 2")
        _require(self.max_consecutive_skips >= 1, "training.max_consecutive_skips", self.max_consecutive_skips,
                 "an integer >= 1")
        _require(0 < self.recovery_lr_factor <= 1, "training.recovery_lr_factor", self.recovery_lr_factor,
                 "0 < x <= 1")
        _require(self.max_restores >= 0, "training.max_restores", self.max_restores, "an integer >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "TrainConfig":
        return _from_mapping(cls, data, "training")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how text becomes tokens.

    source: "embedded" (CPython's pydoc topics: present everywhere), "text" (a file at `path`) or "tokens"
    (a pre-tokenised .npy/.bin file at `path`).

    tokenizer:
      * "byte" (the default): one token per byte; model.vocab_size >= 256 for text sources.
      * "bpe": byte-level BPE (phase1_jax.tokenizer). Without `tokenizer_path` it is trained on the training
        split of the text with `tokenizer_vocab_size` ids; with it, that tokenizer.json is used as it is.
        Either way model.vocab_size must equal the tokenizer's vocabulary size (checked before training),
        and the tokenizer is saved as tokenizer.json in the run and checkpoint directories.
      With source "tokens" the file is already tokenised and is never re-tokenised: "bpe" then needs
      `tokenizer_path`, the tokenizer that produced the ids, which is kept with the run for decoding.
    """

    source: str = "embedded"
    path: str | None = None
    token_dtype: str | None = None
    val_fraction: float = 0.05
    tokenizer: str = "byte"
    tokenizer_vocab_size: int = 8192
    tokenizer_path: str | None = None

    def __post_init__(self):
        _check_types(self, "data.")
        _require(self.source in DATA_SOURCES, "data.source", self.source, " | ".join(DATA_SOURCES))
        _require(self.source == "embedded" or self.path is not None, "data.path", self.path,
                 f"a file path when data.source is '{self.source}'")
        _require(self.token_dtype is None or self.token_dtype in TOKEN_DTYPES, "data.token_dtype",
                 self.token_dtype, " | ".join(TOKEN_DTYPES) + " (or null)")
        _require(0.0 < self.val_fraction < 0.5, "data.val_fraction", self.val_fraction, "0 < x < 0.5")
        _require(self.tokenizer in TOKENIZER_KINDS, "data.tokenizer", self.tokenizer, " | ".join(TOKENIZER_KINDS))
        low, high = BPE_VOCAB_RANGE
        _require(low <= self.tokenizer_vocab_size <= high, "data.tokenizer_vocab_size", self.tokenizer_vocab_size,
                 f"{low} <= x <= {high} (the 256-byte alphabet plus merges)")
        _require(self.tokenizer_path is None or self.tokenizer == "bpe", "data.tokenizer_path", self.tokenizer_path,
                 "null when data.tokenizer is 'byte' (the byte tokenizer has no file)")
        _require(not (self.source == "tokens" and self.tokenizer == "bpe" and self.tokenizer_path is None),
                 "data.tokenizer_path", self.tokenizer_path,
                 "the tokenizer.json that produced the token file when data.source is 'tokens' and data.tokenizer "
                 "is 'bpe' (token files are never re-tokenised)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "DataConfig":
        return _from_mapping(cls, data, "data")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "training": self.training.to_dict(), "data": self.data.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "RunConfig":
        data = dict(data or {})
        unknown = sorted(set(data) - {"model", "training", "data"})
        if unknown:
            raise InvalidConfigError(unknown[0], data[unknown[0]], "allowed top-level keys: model, training, data")
        return cls(model=ModelConfig.from_dict(data.get("model")),
                   training=TrainConfig.from_dict(data.get("training")),
                   data=DataConfig.from_dict(data.get("data")))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "RunConfig":
        return cls.from_dict(yaml.safe_load(text))

    def with_overrides(self, overrides: Mapping[str, Any]) -> "RunConfig":
        """Applies dotted overrides such as {"training.steps": 10, "model.phase1.htt_rank": 8}."""
        tree = self.to_dict()
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = tree
            for part in parents:
                if not isinstance(node.get(part), dict):
                    if part == "phase1" and node.get(part) is None:
                        node[part] = Phase1Config().to_dict()
                    else:
                        raise InvalidConfigError(dotted, value, f"'{part}' is not a section of the config")
                node = node[part]
            if leaf not in node:
                raise InvalidConfigError(dotted, value, f"unknown key; allowed here: {sorted(node)}")
            node[leaf] = value
        return RunConfig.from_dict(tree)


def load_run_config(path: str) -> RunConfig:
    with open(path, "r", encoding="utf-8") as fh:
        text = fh.read()
    try:
        return RunConfig.from_yaml(text)
    except InvalidConfigError as err:
        raise InvalidConfigError(err.param_name, err.param_value, f"{err.reason} (in {path})") from None
