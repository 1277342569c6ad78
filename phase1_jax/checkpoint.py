"""Checkpoints: Orbax behind one small module.

Two kinds. A *model checkpoint* (what `train` writes at the end, `import-torch` and the converters write, and
`logits`, `export-torch` and the converters read) is a directory holding

    config.yaml   the resolved run configuration (model, training, data), validated again on load
    meta.json     format version, training step, library version (and what the writer adds: the tokenizer, ...)
    state/        Orbax PyTree checkpoint of {"params": ..., "buffers": ...} as plain nested dicts
    tokenizer.json  the BPE tokenizer of a run trained with one (absent: byte-level); see load_run_tokenizer

It is written into a temporary sibling directory and renamed into place only when complete, so a failure or
an interrupted save never leaves a half-written checkpoint under the final name. Restoring goes against an
abstract tree built from the config, so shapes and dtypes are checked, not trusted.

*Training checkpoints* (`TrainCheckpoints`) hold a run's whole state, to resume it exactly:
RUN/checkpoints/<step>/ with `state` (parameters, buffers, optimizer state, step, RNG, the guard's loss window)
and `meta` (JSON: the data position, the recovery state, the memory plan, the run config, the tokenizer). They
are Orbax `CheckpointManager` steps: written asynchronously, committed only when complete, the newest
`keep_checkpoints` kept. A model can be read from them too (`load_checkpoint(RUN)` falls back to the newest one
when the run has no final checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from . import __version__
from .config import RunConfig
from .errors import CheckpointError, InputValidationError
from .models.common import split_model
from .models.resnet_bk import ResNetBK
from .tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
STATE_DIR = "state"
TRAIN_CHECKPOINTS_DIR = "checkpoints"
TRAIN_FORMAT_VERSION = 2


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(directory: str | os.PathLike, config: RunConfig, params: nnx.State, buffers: nnx.State, *,
                    step: int = 0, extra_meta: dict[str, Any] | None = None,
                    extra_files: dict[str, bytes] | None = None, overwrite: bool = False) -> Path:
    """Saves parameters and buffers with their config. Atomic: the directory appears complete or not at all.

    `extra_files` maps plain file names to contents (e.g. {"tokenizer.json": ...}); they are written into
    the checkpoint before it is renamed into place, so they are part of the same atomic write.
    """
    final = Path(directory).absolute()
    if final.exists() and not overwrite:
        raise CheckpointError(f"checkpoint directory {final} already exists (pass overwrite=True to replace it)")
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if name in (CONFIG_FILE, META_FILE, STATE_DIR) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"extra checkpoint file name {name!r} is not allowed: a plain file name other "
                                  f"than {CONFIG_FILE}, {META_FILE} and {STATE_DIR}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    except OSError as err:
        raise CheckpointError(f"cannot write a checkpoint under {final.parent}: {err}") from err
    try:
        tree = {"params": nnx.to_pure_dict(params), "buffers": nnx.to_pure_dict(buffers)}
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / STATE_DIR, tree)
        checkpointer.wait_until_finished()
        (staging / CONFIG_FILE).write_text(config.to_yaml(), encoding="utf-8")
        meta = {"format_version": FORMAT_VERSION, "step": int(step), "phase1_jax_version": __version__}
        meta.update(extra_meta or {})
        (staging / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        for name, data in extra_files.items():
            (staging / name).write_bytes(data)
        if final.exists():
            trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.replace(final, trash / "old")
            os.replace(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, (OSError, ValueError)):
            raise CheckpointError(f"failed to save checkpoint to {final}: {err}") from err
        raise
    return final


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Accepts a checkpoint directory or a run directory holding `checkpoint/`."""
    path = Path(path).absolute()  # Orbax accepts absolute paths only
    for candidate in (path, path / "checkpoint"):
        if (candidate / STATE_DIR).is_dir() and (candidate / CONFIG_FILE).is_file():
            return candidate
    raise CheckpointError(f"{path} is neither a checkpoint directory (with {CONFIG_FILE} and {STATE_DIR}/) "
                          f"nor a run directory containing checkpoint/")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    ckpt = resolve_checkpoint_dir(path)
    meta_path = ckpt / META_FILE
    return json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}


def load_checkpoint(path: str | os.PathLike) -> tuple[RunConfig, ResNetBK]:
    """Returns (config, model) with the restored parameters and buffers.

    `path` is a model checkpoint, a run directory with its final `checkpoint/`, or a run directory with only
    training checkpoints (a run that was stopped): then the newest intact one is read."""
    run = Path(path).absolute()
    if not (run / STATE_DIR).is_dir() and not (run / "checkpoint" / STATE_DIR).is_dir() \
            and (run / TRAIN_CHECKPOINTS_DIR).is_dir():
        config = RunConfig.from_yaml((run / CONFIG_FILE).read_text(encoding="utf-8"))
        _, model, _ = TrainCheckpoints(run).restore_model(config)
        return config, model
    ckpt = resolve_checkpoint_dir(path)
    config = RunConfig.from_yaml((ckpt / CONFIG_FILE).read_text(encoding="utf-8"))
    meta = read_meta(ckpt)
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{ckpt} has format version {meta['format_version']}; this phase1-jax reads "
                              f"up to {FORMAT_VERSION}")
    abstract_model = nnx.eval_shape(lambda: ResNetBK(config.model, rngs=nnx.Rngs(0)))
    graphdef, params, buffers = split_model(abstract_model)
    target = {"params": nnx.to_pure_dict(params), "buffers": nnx.to_pure_dict(buffers)}
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    try:
        restored = ocp.StandardCheckpointer().restore(ckpt / STATE_DIR, abstract)
    except Exception as err:  # Orbax raises several types for mismatched trees
        raise CheckpointError(f"checkpoint {ckpt} does not match its config.yaml: {err}") from err
    nnx.replace_by_pure_dict(params, restored["params"])
    nnx.replace_by_pure_dict(buffers, restored["buffers"])
    return config, nnx.merge(graphdef, params, buffers)


def load_run_tokenizer(path: str | os.PathLike) -> ByteTokenizer | BPETokenizer:
    """Returns the tokenizer of a run or checkpoint directory: what every command that reads text uses.

    A checkpoint with `tokenizer.json` gets that BPE tokenizer, checked against the fingerprint recorded in
    meta.json and against the model's vocabulary size; one without it (byte-level runs, imported PyTorch
    checkpoints, checkpoints older than tokenizers) gets the byte tokenizer.
    """
    ckpt = resolve_checkpoint_dir(path)
    record = read_meta(ckpt).get("tokenizer") or {}
    file = ckpt / TOKENIZER_FILE
    if not file.exists():
        if record.get("kind", ByteTokenizer.kind) != ByteTokenizer.kind:
            raise CheckpointError(f"{ckpt}: meta.json records a {record['kind']!r} tokenizer but {TOKENIZER_FILE} "
                                  f"is missing")
        return ByteTokenizer()
    try:
        tokenizer = BPETokenizer.load(file)
    except InputValidationError as err:
        raise CheckpointError(f"{ckpt}: {err}") from None
    if record.get("sha256", tokenizer.sha256) != tokenizer.sha256:
        raise CheckpointError(f"{file} does not match the sha256 recorded in meta.json ({record['sha256']}); "
                              f"it was changed after the checkpoint was written")
    vocab_size = RunConfig.from_yaml((ckpt / CONFIG_FILE).read_text(encoding="utf-8")).model.vocab_size
    if tokenizer.vocab_size != vocab_size:
        raise CheckpointError(f"{file} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                              f"{vocab_size}")
    return tokenizer


# ------------------------------------------------------------------------------------------ training checkpoints


def _state_tree(state) -> dict[str, Any]:
    """A TrainState as the plain tree Orbax saves (typed PRNG keys as their raw key data)."""
    return {"step": state.step, "params": nnx.to_pure_dict(state.params), "buffers": nnx.to_pure_dict(state.buffers),
            "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng),
            "guard": {"losses": state.guard.losses, "accepted": state.guard.accepted,
                      "consecutive_skips": state.guard.consecutive_skips,
                      "skipped_total": state.guard.skipped_total}}


def _from_state_tree(tree: dict[str, Any], like):
    """The TrainState `like` (same graph structure) holding the values of a restored tree."""
    from .train import GuardState

    params, buffers = jax.tree.map(lambda x: x, like.params), jax.tree.map(lambda x: x, like.buffers)  # copies
    nnx.replace_by_pure_dict(params, tree["params"])
    nnx.replace_by_pure_dict(buffers, tree["buffers"])
    return like.replace(step=tree["step"], params=params, buffers=buffers, opt_state=tree["opt_state"],
                        rng=jax.random.wrap_key_data(tree["rng"]), guard=GuardState(**tree["guard"]))


class TrainCheckpoints:
    """A run's whole-state checkpoints: RUN/checkpoints/<step>/{state, meta} through Orbax's CheckpointManager."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, *, create: bool = False):
        self.directory = Path(run_dir).absolute() / TRAIN_CHECKPOINTS_DIR
        if not create and not self.directory.is_dir():
            raise CheckpointError(f"{Path(run_dir)} has no training checkpoints ({TRAIN_CHECKPOINTS_DIR}/): it is not "
                                  f"a run directory, or the run stopped before its first checkpoint")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Committed steps, oldest first (a save still in flight or cut short is not listed)."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Starts writing `state` at `step` in the background; the step appears only once complete."""
        meta = dict(meta, format_version=TRAIN_FORMAT_VERSION, step=int(step), phase1_jax_version=__version__)
        self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(_state_tree(state)),
                                                              meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def restore_latest(self, like) -> tuple[int, Any, dict[str, Any], list[str]]:
        """(step, state, meta, notes) from the newest checkpoint that reads back; `like` is a TrainState of the
        right structure (e.g. a freshly initialised one). An unreadable newest checkpoint is reported in `notes`
        and the one before it used; none readable is a CheckpointError."""
        abstract = jax.eval_shape(_state_tree, like)
        notes = []
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"{self.directory} holds no complete checkpoint")
        for step in reversed(steps):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as err:  # noqa: BLE001 - Orbax raises many types for damaged files
                notes.append(f"checkpoint step {step} in {self.directory} is unreadable "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); trying an older one")
                continue
            return step, _from_state_tree(restored["state"], like), dict(restored["meta"]), notes
        raise CheckpointError(f"no checkpoint in {self.directory} reads back: " + "; ".join(notes))

    def latest_meta(self) -> dict[str, Any] | None:
        """The meta of the newest checkpoint whose meta reads back (cheap: no arrays), or None."""
        for step in reversed(self.steps()):
            try:
                return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
            except Exception:  # noqa: BLE001 - a damaged checkpoint: look at the one before
                continue
        return None

    def discard_after(self, step: int) -> list[int]:
        """Deletes the checkpoints newer than `step` (unreadable ones, once a resume went back past them);
        returns their steps."""
        newer = [s for s in self.steps() if s > step]
        for s in newer:
            self._manager.delete(s)
        return newer

    def restore_model(self, config: RunConfig) -> tuple[int, ResNetBK, dict[str, Any]]:
        """(step, model, meta) from the newest readable checkpoint: parameters and buffers only."""
        graphdef, like = abstract_train_state(config)
        step, state, meta, _ = self.restore_latest(like)
        return step, nnx.merge(graphdef, state.params, state.buffers), meta


def abstract_train_state(config: RunConfig):
    """(graphdef, TrainState of ShapeDtypeStructs) of a run: the target a training checkpoint restores into."""
    from .train import build_model, create_train_state

    graphdef, _, _ = split_model(nnx.eval_shape(lambda: ResNetBK(config.model, rngs=nnx.Rngs(0))))
    like = jax.eval_shape(lambda: create_train_state(build_model(config.model, config.training.seed),
                                                     config.training)[1])
    return graphdef, like
