"""One training run end to end: data, loop, and a run directory.

    OUT/config.yaml      the resolved configuration
    OUT/metrics.jsonl    one JSON object per logged step
    OUT/summary.json     final validation loss, the corpus's unigram entropy, timings, data fingerprint, tokenizer
    OUT/tokenizer.json   the BPE tokenizer (data.tokenizer: bpe only; also in OUT/checkpoint/)
    OUT/checkpoint/      the final parameters (Orbax; see checkpoint.py)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np

from .checkpoint import save_checkpoint
from .config import DataConfig, RunConfig
from .data import (
    BatchIterator,
    corpus_fingerprint,
    eval_batches,
    load_text,
    load_tokens,
    split_text,
    train_val_split,
    unigram_entropy_nats,
    validate_token_range,
)
from .errors import CheckpointError, InputValidationError, InvalidConfigError
from .tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, tokenizer_files
from .train import train_loop


class _Data(NamedTuple):
    tokenizer: ByteTokenizer | BPETokenizer
    tokens: np.ndarray  # the whole stream, train then validation
    train: np.ndarray
    val: np.ndarray
    val_text_bytes: int | None  # UTF-8 size of the validation text; None for token files


def _load_bpe(data_cfg: DataConfig, vocab_size: int) -> BPETokenizer:
    try:
        tokenizer = BPETokenizer.load(data_cfg.tokenizer_path)
    except InputValidationError as err:
        raise InvalidConfigError("data.tokenizer_path", data_cfg.tokenizer_path, str(err)) from None
    if tokenizer.vocab_size != vocab_size:
        raise InvalidConfigError("model.vocab_size", vocab_size,
                                 f"must equal the vocabulary size {tokenizer.vocab_size} of data.tokenizer_path "
                                 f"{data_cfg.tokenizer_path!r}: set model.vocab_size={tokenizer.vocab_size}")
    return tokenizer


def _load_data(data_cfg: DataConfig, vocab_size: int, seq_len: int) -> _Data:
    """Tokenizer and token streams, with every input check done before anything is trained."""
    where = data_cfg.path or "the embedded corpus"
    if data_cfg.tokenizer == "byte" or data_cfg.source == "tokens":
        if data_cfg.tokenizer == "byte" and data_cfg.source != "tokens" and vocab_size < 256:
            raise InvalidConfigError("model.vocab_size", vocab_size,
                                     f">= 256 (byte-level tokens) when data.source is '{data_cfg.source}'")
        # A token file is used as it is; a BPE tokenizer with it (config: tokenizer_path) is for decoding.
        tokenizer = ByteTokenizer() if data_cfg.tokenizer == "byte" else _load_bpe(data_cfg, vocab_size)
        tokens = load_tokens(data_cfg.source, data_cfg.path, data_cfg.token_dtype)
        validate_token_range(tokens, vocab_size, where=where)
        train, val = train_val_split(tokens, data_cfg.val_fraction, seq_len)
        return _Data(tokenizer, tokens, train, val, None if data_cfg.source == "tokens" else val.size)

    if data_cfg.tokenizer_path is not None:
        tokenizer = _load_bpe(data_cfg, vocab_size)
    elif data_cfg.tokenizer_vocab_size != vocab_size:
        raise InvalidConfigError("model.vocab_size", vocab_size,
                                 f"must equal data.tokenizer_vocab_size = {data_cfg.tokenizer_vocab_size}, the "
                                 f"BPE tokenizer's vocabulary size: set both to the same value")
    train_text, val_text = split_text(load_text(data_cfg.source, data_cfg.path), data_cfg.val_fraction, where)
    if data_cfg.tokenizer_path is None:
        tokenizer = BPETokenizer.train(train_text, data_cfg.tokenizer_vocab_size)
        if tokenizer.vocab_size != vocab_size:
            raise InvalidConfigError("data.tokenizer_vocab_size", data_cfg.tokenizer_vocab_size,
                                     f"at most {tokenizer.vocab_size} for the training split of {where} (BPE "
                                     f"stops when every word is one token): set data.tokenizer_vocab_size and "
                                     f"model.vocab_size to {tokenizer.vocab_size} or less")
    train, val = tokenizer.encode(train_text), tokenizer.encode(val_text)
    if min(train.size, val.size) < seq_len + 1:
        raise InputValidationError(f"{where} with val_fraction={data_cfg.val_fraction} gives train {train.size} "
                                   f"and validation {val.size} BPE tokens, but each needs at least seq_len + 1 "
                                   f"= {seq_len + 1}")
    return _Data(tokenizer, np.concatenate([train, val]), train, val, len(val_text.encode("utf-8")))


def run_training(config: RunConfig, out_dir: str | Path, *,
                 progress: Callable[[int, dict], None] | None = None) -> dict:
    out = Path(out_dir)
    if (out / "checkpoint").exists():
        raise CheckpointError(f"{out} already holds a finished run; choose another --out")
    data_cfg, model_cfg, train_cfg = config.data, config.model, config.training
    # All input validation happens before any compilation or training.
    seq_len = model_cfg.n_seq
    data = _load_data(data_cfg, model_cfg.vocab_size, seq_len)
    tokens, train_tokens, val_tokens = data.tokens, data.train, data.val
    batches = BatchIterator(train_tokens, train_cfg.batch_size, seq_len, seed=train_cfg.seed)
    val = eval_batches(val_tokens, train_cfg.batch_size, seq_len, train_cfg.eval_batches)

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    if isinstance(data.tokenizer, BPETokenizer):
        data.tokenizer.save(out / TOKENIZER_FILE)
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
                    step=train_cfg.steps, extra_meta={"tokenizer": data.tokenizer.describe()},
                    extra_files=tokenizer_files(data.tokenizer))
    summary = {
        "final_val_loss": result.final_val_loss,
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        "unigram_entropy_nats": unigram_entropy_nats(tokens, model_cfg.vocab_size),
        "steps": train_cfg.steps,
        "train_seconds": elapsed,
        "data_fingerprint": corpus_fingerprint(tokens),
        "num_train_tokens": int(train_tokens.size),
        "num_val_tokens": int(val_tokens.size),
        "tokenizer": data.tokenizer.describe(),
        # Converts per-token losses to per-byte ones, the unit in which byte and BPE runs compare.
        "val_bytes_per_token": None if data.val_text_bytes is None else data.val_text_bytes / val_tokens.size,
        "device": str(jax.devices()[0]),
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(result.state.params))),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
