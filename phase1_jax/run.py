"""One training run end to end: data, loop, and a run directory.

    OUT/config.yaml      the resolved configuration
    OUT/metrics.jsonl    one JSON object per logged step
    OUT/summary.json     final validation loss, the corpus's unigram entropy, timings, data fingerprint
    OUT/checkpoint/      the final parameters (Orbax; see checkpoint.py)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import jax

from .checkpoint import save_checkpoint
from .config import RunConfig
from .data import (
    BatchIterator,
    corpus_fingerprint,
    eval_batches,
    load_tokens,
    train_val_split,
    unigram_entropy_nats,
    validate_token_range,
)
from .errors import CheckpointError, InvalidConfigError
from .train import train_loop


def run_training(config: RunConfig, out_dir: str | Path, *,
                 progress: Callable[[int, dict], None] | None = None) -> dict:
    out = Path(out_dir)
    if (out / "checkpoint").exists():
        raise CheckpointError(f"{out} already holds a finished run; choose another --out")
    data_cfg, model_cfg, train_cfg = config.data, config.model, config.training
    # All input validation happens before any compilation or training.
    if data_cfg.source != "tokens" and model_cfg.vocab_size < 256:
        raise InvalidConfigError("model.vocab_size", model_cfg.vocab_size,
                                 f">= 256 (byte-level tokens) when data.source is '{data_cfg.source}'")
    tokens = load_tokens(data_cfg.source, data_cfg.path, data_cfg.token_dtype)
    validate_token_range(tokens, model_cfg.vocab_size, where=data_cfg.path or "the embedded corpus")
    seq_len = model_cfg.n_seq
    train_tokens, val_tokens = train_val_split(tokens, data_cfg.val_fraction, seq_len)
    batches = BatchIterator(train_tokens, train_cfg.batch_size, seq_len, seed=train_cfg.seed)
    val = eval_batches(val_tokens, train_cfg.batch_size, seq_len, train_cfg.eval_batches)

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    metrics_path = out / "metrics.jsonl"
    metrics_file = metrics_path.open("w", encoding="utf-8")

    def on_metrics(record: dict) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    start = time.perf_counter()
    try:
        result = train_loop(model_cfg, train_cfg, batches.batch_at, val, on_metrics=on_metrics,
                            progress=progress)
    finally:
        metrics_file.close()
    elapsed = time.perf_counter() - start
    save_checkpoint(out / "checkpoint", config, result.state.params, result.state.buffers,
                    step=train_cfg.steps)
    summary = {
        "final_val_loss": result.final_val_loss,
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        "unigram_entropy_nats": unigram_entropy_nats(tokens, model_cfg.vocab_size),
        "steps": train_cfg.steps,
        "train_seconds": elapsed,
        "data_fingerprint": corpus_fingerprint(tokens),
        "num_train_tokens": int(train_tokens.size),
        "num_val_tokens": int(val_tokens.size),
        "device": str(jax.devices()[0]),
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(result.state.params))),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
