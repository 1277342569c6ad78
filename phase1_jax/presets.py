"""Built-in run presets: named overrides of the default RunConfig.

`default` is the main job (what `make run` and a bare `phase1-jax train` train). `default-bpe` is the same
Phase 1 model over a BPE vocabulary of 8192 learned from the corpus (phase1_jax.tokenizer), so the HTT
embedding has a table worth factorising: the preset for perplexity runs. `tiny` and `tiny-phase1` are smoke
runs that finish in seconds on a CPU. Every other preset is byte-level; any of them becomes BPE with
`--set data.tokenizer=bpe --set data.tokenizer_vocab_size=N --set model.vocab_size=N`. The Phase 1 memory
presets (8gb, 10gb, ...) are separate: they configure the `phase1` block only, see
`phase1_jax.phase1_config.get_preset_config`.
"""

from __future__ import annotations

import copy
from typing import Any

from .config import RunConfig
from .errors import InvalidConfigError

_TINY_MODEL = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_seq": 32, "num_experts": 4, "top_k": 1,
               "dropout": 0.0, "numerics": "native"}
_TINY_TRAINING = {"batch_size": 8, "steps": 20, "learning_rate": 3e-3, "warmup_steps": 2, "log_every": 5,
                  "eval_every": 10, "eval_batches": 2}
_SMALL_PHASE1 = {"ar_ssm_max_rank": 8, "ar_ssm_min_rank": 2, "ar_ssm_rank_warmup_steps": 10, "htt_rank": 8,
                 "use_gradient_checkpointing": False, "checkpoint_ar_ssm": False}

_DEFAULT_MODEL = {"vocab_size": 256, "d_model": 64, "n_layers": 4, "n_seq": 128, "num_experts": 4, "top_k": 1,
                  "dropout": 0.0, "numerics": "native",
                  "phase1": {"ar_ssm_max_rank": 16, "ar_ssm_min_rank": 4, "ar_ssm_rank_warmup_steps": 300,
                             "htt_rank": 16, "use_gradient_checkpointing": False, "checkpoint_ar_ssm": False}}
_DEFAULT_TRAINING = {"batch_size": 16, "steps": 1000, "learning_rate": 3e-3, "warmup_steps": 50, "log_every": 25,
                     "eval_every": 250, "eval_batches": 8}
# 8192 is the largest power of two the embedded corpus supports (its training split stops at 9054 ids).
_BPE_VOCAB = 8192

RUN_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"model": _DEFAULT_MODEL, "training": _DEFAULT_TRAINING},
    "default-bpe": {"model": dict(_DEFAULT_MODEL, vocab_size=_BPE_VOCAB), "training": _DEFAULT_TRAINING,
                    "data": {"tokenizer": "bpe", "tokenizer_vocab_size": _BPE_VOCAB}},
    "default-baseline": {
        "model": {"vocab_size": 256, "d_model": 64, "n_layers": 4, "n_seq": 128, "num_experts": 4, "top_k": 1,
                  "dropout": 0.0, "numerics": "native"},
        "training": {"batch_size": 16, "steps": 1000, "learning_rate": 3e-3, "warmup_steps": 50,
                     "log_every": 25, "eval_every": 250, "eval_batches": 8},
    },
    "tiny": {"model": _TINY_MODEL, "training": _TINY_TRAINING},
    "tiny-phase1": {"model": dict(_TINY_MODEL, phase1=_SMALL_PHASE1), "training": _TINY_TRAINING},
}


def run_preset(name: str) -> RunConfig:
    """A fresh RunConfig for a named preset."""
    if name not in RUN_PRESETS:
        raise InvalidConfigError("preset", name, f"allowed: {', '.join(sorted(RUN_PRESETS))}")
    return RunConfig.from_dict(copy.deepcopy(RUN_PRESETS[name]))
