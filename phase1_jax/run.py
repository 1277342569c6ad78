"""One training run end to end: data, loop, and a run directory.

    OUT/config.yaml      the resolved configuration
    OUT/metrics.jsonl    one JSON object per logged step
    OUT/summary.json     final validation loss, the corpus's unigram entropy, timings, data fingerprint, tokenizer
    OUT/tokenizer.json   the BPE tokenizer (data.tokenizer: bpe only; also in OUT/checkpoint/)
    OUT/checkpoint/      the final parameters (Orbax; see checkpoint.py)
    OUT/checkpoints/     whole-state training checkpoints, for --resume (see trainer.py)
    OUT/tensorboard/     TensorBoard event files

`run_training` starts a run, `init_training` starts one from a checkpoint's model, `resume_training` continues a
run from its newest intact training checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np
from flax import nnx

from .checkpoint import (
    CONFIG_FILE,
    TRAIN_CHECKPOINTS_DIR,
    TrainCheckpoints,
    write_text_atomic,
    abstract_train_state,
    load_checkpoint,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from .config import DataConfig, ModelConfig, RunConfig
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
from .models.common import split_model
from .models.resnet_bk import ResNetBK
from .tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, tokenizer_files
from .train import build_model, create_train_state
from .trainer import Trainer, TrainData, host_state_from_meta, truncate_metrics
from .converters.phase1_conversion import copy_matching


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


def _check_fresh(out: Path) -> None:
    if (out / "checkpoint").exists():
        raise CheckpointError(f"{out} already holds a finished run; choose another --out")
    if (out / TRAIN_CHECKPOINTS_DIR).exists():
        raise CheckpointError(f"{out} holds a run in progress: continue it with `phase1-jax train --resume {out}` "
                              f"or choose another --out")


def _param_shapes(model_cfg: ModelConfig) -> dict[str, tuple]:
    model = nnx.eval_shape(lambda: ResNetBK(model_cfg, rngs=nnx.Rngs(0)))
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}


def check_same_shapes(old: ModelConfig, new: ModelConfig, what: str) -> None:
    """Refuses a model config whose parameters differ in name or shape from `old`'s, naming the fields."""
    if _param_shapes(old) == _param_shapes(new):
        return
    a, b = old.to_dict(), new.to_dict()
    changed = {k: (a[k], b[k]) for k in a if a[k] != b[k] and k != "phase1"}
    if a["phase1"] != b["phase1"]:
        p, q = a["phase1"] or {}, b["phase1"] or {}
        changed.update({f"phase1.{k}": (p.get(k), q.get(k)) for k in sorted(set(p) | set(q)) if p.get(k) != q.get(k)})
        if a["phase1"] is None or b["phase1"] is None:
            changed["phase1"] = ("set" if a["phase1"] else None, "set" if b["phase1"] else None)
    fields = ", ".join(f"model.{k}: {v[0]!r} -> {v[1]!r}" for k, v in changed.items())
    raise InvalidConfigError("model", fields or "(parameter layout)",
                             f"{what} keeps the model's parameter shapes; these changes alter them")


def _summary(config: RunConfig, data: _Data, result, elapsed: float, extra: dict | None = None) -> dict:
    return {
        "final_val_loss": result.final_val_loss,
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        "unigram_entropy_nats": unigram_entropy_nats(data.tokens, config.model.vocab_size),
        "steps": config.training.steps,
        "train_seconds": elapsed,
        "data_fingerprint": corpus_fingerprint(data.tokens),
        "num_train_tokens": int(data.train.size),
        "num_val_tokens": int(data.val.size),
        "tokenizer": data.tokenizer.describe(),
        # Converts per-token losses to per-byte ones, the unit in which byte and BPE runs compare.
        "val_bytes_per_token": None if data.val_text_bytes is None else data.val_text_bytes / data.val.size,
        "device": str(jax.devices()[0]),
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(result.state.params))),
        **(extra or {}),
    }


def _train(config: RunConfig, out: Path, data: _Data, graphdef, state, *, host=None, faults=None, progress=None,
           metrics_mode: str = "w", extra_summary: dict | None = None) -> dict:
    train_cfg, seq_len = config.training, config.model.n_seq
    batches = BatchIterator(data.train, train_cfg.batch_size, seq_len, seed=train_cfg.seed)
    val = eval_batches(data.val, train_cfg.batch_size, seq_len, train_cfg.eval_batches)
    trainer = Trainer(config, out, TrainData(batches.batch_at, val, data.tokenizer.describe()), graphdef, state,
                      host=host, faults=faults, progress=progress, metrics_mode=metrics_mode)
    start = time.perf_counter()
    result = trainer.run()
    elapsed = time.perf_counter() - start
    save_checkpoint(out / "checkpoint", config, result.state.params, result.state.buffers,
                    step=train_cfg.steps, extra_meta={"tokenizer": data.tokenizer.describe()},
                    extra_files=tokenizer_files(data.tokenizer), overwrite=True)
    summary = _summary(config, data, result, elapsed, extra_summary)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _start_run_dir(out: Path, config: RunConfig, data: _Data) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", config.to_yaml())
    if isinstance(data.tokenizer, BPETokenizer):
        data.tokenizer.save(out / TOKENIZER_FILE)


def run_training(config: RunConfig, out_dir: str | Path, *, progress: Callable[[int, dict], None] | None = None,
                 faults: dict[int, list[str]] | None = None) -> dict:
    """A new run from freshly initialised parameters."""
    out = Path(out_dir)
    _check_fresh(out)
    # All input validation happens before any compilation or training.
    data = _load_data(config.data, config.model.vocab_size, config.model.n_seq)
    model = build_model(config.model, seed=config.training.seed)
    graphdef, state, _ = create_train_state(model, config.training)
    del model
    _start_run_dir(out, config, data)
    return _train(config, out, data, graphdef, state, faults=faults, progress=progress)


def init_training(config: RunConfig, out_dir: str | Path, init_from: str | Path, *, model_overrides: dict | None = None,
                  progress: Callable[[int, dict], None] | None = None, faults: dict[int, list[str]] | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """A new run whose model (architecture and weights) comes from a checkpoint: one `train` wrote, `import-torch`
    imported or a converter made. `model_overrides` ({"numerics": "native", ...}) may change anything but the
    parameters' shapes. The optimizer state is carried over where the checkpoint holds one (a training
    checkpoint of a run) with the same optimizer and shapes; otherwise it starts fresh."""
    log = log or (lambda message: print(f"phase1-jax train: {message}", file=sys.stderr, flush=True))
    out = Path(out_dir)
    _check_fresh(out)
    source_config, model = load_checkpoint(init_from)
    model_cfg = source_config.model.replace(**(model_overrides or {}))
    check_same_shapes(source_config.model, model_cfg, "--init-from")
    if source_config.model.numerics == "reference" and model_cfg.numerics == "native":
        log("warning: switching an imported reference-numerics model to native numerics: the BK-Core becomes causal "
            "(each position sees only the past) with exact gradients, the scattering term is dropped; the weights "
            "are kept, but the model computes a different function until it is trained further")
    config = dataclasses.replace(config, model=model_cfg, data=_data_for_source(config.data, init_from, log))
    data = _load_data(config.data, model_cfg.vocab_size, model_cfg.n_seq)
    _, params, buffers = split_model(model)
    target = build_model(model_cfg, seed=config.training.seed)
    graphdef, state, optimizer = create_train_state(target, config.training)
    new_params, copied = copy_matching(nnx.to_pure_dict(params), nnx.to_pure_dict(state.params))
    new_buffers, _ = copy_matching(nnx.to_pure_dict(buffers), nnx.to_pure_dict(state.buffers))
    nnx.replace_by_pure_dict(state.params, new_params)
    nnx.replace_by_pure_dict(state.buffers, new_buffers)
    carried = _carried_opt_state(init_from, source_config, config, state, optimizer)
    if carried is not None:
        state = state.replace(opt_state=carried)
    log(f"initialised from {init_from}: {len(copied)} parameter arrays; optimizer state "
        f"{'carried over' if carried is not None else 'fresh'}")
    _start_run_dir(out, config, data)
    return _train(config, out, data, graphdef, state, faults=faults, progress=progress,
                  extra_summary={"init_from": str(Path(init_from).absolute()),
                                 "optimizer_state_carried": carried is not None})


def _data_for_source(data_cfg: DataConfig, init_from, log) -> DataConfig:
    """The data section for a run that starts from a checkpoint: a BPE model keeps reading its own tokens."""
    try:
        tokenizer_file = resolve_checkpoint_dir(init_from) / TOKENIZER_FILE
    except CheckpointError:  # a stopped run without a final checkpoint
        tokenizer_file = Path(init_from) / TOKENIZER_FILE
    if not tokenizer_file.exists():
        return data_cfg
    if data_cfg.tokenizer == "byte":
        log(f"the checkpoint's model reads BPE tokens: using its tokenizer {tokenizer_file}")
        return dataclasses.replace(data_cfg, tokenizer="bpe", tokenizer_path=str(tokenizer_file))
    if data_cfg.tokenizer_path is None or BPETokenizer.load(data_cfg.tokenizer_path).sha256 != \
            BPETokenizer.load(tokenizer_file).sha256:
        raise InvalidConfigError("data.tokenizer_path", data_cfg.tokenizer_path,
                                 f"the tokenizer the checkpoint was trained with ({tokenizer_file})")
    return data_cfg


def _carried_opt_state(init_from, source_config: RunConfig, config: RunConfig, state, optimizer):
    """The optimizer state of the source run's newest training checkpoint, where it has one of the same kind."""
    run = Path(init_from).absolute()
    if not (run / TRAIN_CHECKPOINTS_DIR).is_dir() or source_config.training.optimizer != config.training.optimizer:
        return None
    source_like = abstract_train_state(source_config)[1]
    try:
        _, source_state, _, _ = TrainCheckpoints(run).restore_latest(source_like)
    except CheckpointError:
        return None
    carried, copied = copy_matching(source_state.opt_state, state.opt_state)
    return carried if copied else None


def resume_training(run_dir: str | Path, overrides: dict | None = None, *,
                    progress: Callable[[int, dict], None] | None = None, faults: dict[int, list[str]] | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
    """Continues a run from its newest intact training checkpoint, with its own config (and `overrides` that keep
    the model's shapes, the data and its order). The steps replayed are bit-identical to an uninterrupted run."""
    log = log or (lambda message: print(f"phase1-jax train: {message}", file=sys.stderr, flush=True))
    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file() or not (run / TRAIN_CHECKPOINTS_DIR).is_dir():
        raise CheckpointError(f"{run} is not a run directory to resume: it needs {CONFIG_FILE} and "
                              f"{TRAIN_CHECKPOINTS_DIR}/ (runs written by `phase1-jax train`)")
    saved = RunConfig.from_yaml((run / CONFIG_FILE).read_text(encoding="utf-8"))
    config = saved.with_overrides(overrides) if overrides else saved
    check_same_shapes(saved.model, config.model, "--resume")
    for name in ("batch_size", "seed"):
        if getattr(saved.training, name) != getattr(config.training, name):
            raise InvalidConfigError(f"training.{name}", getattr(config.training, name),
                                     f"{getattr(saved.training, name)!r}, the run's own: --resume replays the same "
                                     f"batches (start a new run with --init-from to change it)")
    if saved.data != config.data:
        raise InvalidConfigError("data", "changed", "the run's own data section: --resume replays the same batches")
    graphdef, like = abstract_train_state(config)
    checkpoints = TrainCheckpoints(run)
    try:
        # The checkpoints record the config they were written with: an edited config.yaml is caught here.
        written_meta = checkpoints.latest_meta()
        if written_meta is not None:
            written = RunConfig.from_dict(written_meta["config"])
            check_same_shapes(written.model, saved.model, f"{run / CONFIG_FILE} (edited after the run started)")
        step, state, meta, notes = checkpoints.restore_latest(like)
        for note in notes:
            log(note)
        discarded = checkpoints.discard_after(step)
        if discarded:
            log(f"removed the unreadable checkpoints of steps {discarded}")
    finally:
        checkpoints.close()
    if step >= config.training.steps:
        raise InvalidConfigError("training.steps", config.training.steps,
                                 f"more than the {step} steps the run has done (e.g. --steps {2 * step})")
    log(f"resuming {run} from step {step}")
    data_cfg = config.data
    if data_cfg.tokenizer == "bpe" and data_cfg.tokenizer_path is None and (run / TOKENIZER_FILE).exists():
        data_cfg = dataclasses.replace(data_cfg, tokenizer_path=str(run / TOKENIZER_FILE))  # the run's own
    data = _load_data(data_cfg, config.model.vocab_size, config.model.n_seq)
    truncate_metrics(run / "metrics.jsonl", step)
    write_text_atomic(run / "config.yaml", config.to_yaml())
    return _train(config, run, data, graphdef, state, host=host_state_from_meta(meta), faults=faults,
                  progress=progress, metrics_mode="a", extra_summary={"resumed_from_step": step})
