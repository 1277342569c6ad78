"""The `phase1-jax` command line.

    phase1-jax train [--preset NAME | --config FILE.yaml] [--steps N] [--out DIR] [--set key=value ...]
    phase1-jax logits RUN_OR_CKPT_DIR --ids IDS.npy --out OUT.npy
    phase1-jax import-torch SRC.pt OUT_DIR [--top-k K] [--dropout P] ...
    phase1-jax export-torch CKPT_DIR OUT.pt [--format pt|safetensors]
    phase1-jax convert-to-phase1 CKPT_DIR OUT_DIR [--preset NAME] [--htt-rank R] ...
    phase1-jax convert-from-phase1 CKPT_DIR OUT_DIR [--drop-ar-ssm]
    phase1-jax bench [--out DIR] [--parts throughput,capped,perplexity] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import yaml

from .errors import (
    CheckpointError,
    InputValidationError,
    InvalidConfigError,
    NumericalInstabilityError,
    VRAMExhaustedError,
)


def _parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise InvalidConfigError("--set", pair, "expected key=value, e.g. training.learning_rate=1e-3")
        key, raw = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides


class _ProgressBar:
    """A one-line progress bar on stderr (no dependency; plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.start = total, width, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, step: int, record: dict) -> None:
        frac = step / self.total
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        parts = [f"[{bar}] {step}/{self.total}", f"loss {record['loss']:.4f}"]
        if "val_loss" in record:
            parts.append(f"val {record['val_loss']:.4f}")
        parts += [f"{record['tokens_per_sec']:.0f} tok/s", f"{time.perf_counter() - self.start:.0f}s"]
        line = "  ".join(parts)
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if step == self.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _run_steps(run_dir: str) -> int:
    """training.steps of a run directory's config (1 if it has none: resume_training then says what is wrong)."""
    from .config import RunConfig

    try:
        return RunConfig.from_yaml((Path(run_dir) / "config.yaml").read_text(encoding="utf-8")).training.steps
    except OSError:
        return 1


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_run_config
    from .presets import run_preset
    from .run import init_training, resume_training, run_training
    from .trainer import parse_faults

    faults = parse_faults(args.inject_fault or [])
    overrides = _parse_overrides(args.set or [])
    if args.steps is not None:
        overrides["training.steps"] = args.steps
    if args.resume:
        for flag, value in (("--config", args.config), ("--preset", args.preset), ("--init-from", args.init_from),
                            ("--out", args.out)):
            if value:
                raise InvalidConfigError(flag, value, "not with --resume: a resumed run keeps its own config and "
                                                      "directory (change fields with --set)")
        total = overrides.get("training.steps") or _run_steps(args.resume)
        summary = resume_training(args.resume, overrides, progress=_ProgressBar(total), faults=faults)
        out = Path(args.resume)
    else:
        if args.config and args.preset:
            raise InvalidConfigError("--preset", args.preset, "give either --config or --preset, not both")
        config = load_run_config(args.config) if args.config else run_preset(args.preset or "default")
        out = Path(args.out or Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        if args.init_from:
            # The model comes from the checkpoint; --set model.X changes what keeps its parameter shapes.
            model_overrides = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("model.")}
            if any("." in k for k in model_overrides):
                raise InvalidConfigError("--set", next(k for k in model_overrides if "." in k),
                                         "with --init-from only top-level model fields can be set")
            config = config.with_overrides({k: v for k, v in overrides.items() if not k.startswith("model.")})
            print(f"phase1-jax train: from {args.init_from}, {config.training.steps} steps -> {out}",
                  file=sys.stderr)
            summary = init_training(config, out, args.init_from, model_overrides=model_overrides,
                                    progress=_ProgressBar(config.training.steps), faults=faults)
        else:
            config = config.with_overrides(overrides) if overrides else config
            print(f"phase1-jax train: {'Phase 1' if config.model.is_phase1 else 'baseline'} model, "
                  f"numerics={config.model.numerics}, {config.data.tokenizer} tokens (vocab "
                  f"{config.model.vocab_size}), {config.training.steps} steps -> {out}", file=sys.stderr)
            summary = run_training(config, out, progress=_ProgressBar(config.training.steps), faults=faults)
    print(f"final validation loss {summary['final_val_loss']:.4f} nats "
          f"(corpus unigram entropy {summary['unigram_entropy_nats']:.4f}); checkpoint: {out / 'checkpoint'}")
    return 0


def _save_npy_atomic(path: Path, array) -> None:
    """np.save into a temporary sibling, then rename: a failure never leaves a truncated file."""
    import os
    import tempfile

    import numpy as np

    try:
        fd, tmp = tempfile.mkstemp(dir=path.absolute().parent, prefix=f".{path.name}.", suffix=".partial")
    except OSError as err:
        raise InputValidationError(f"cannot write {path}: {err}") from err
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_logits(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from .checkpoint import load_checkpoint
    from .data import validate_token_range

    config, model = load_checkpoint(args.checkpoint)
    try:
        ids = np.load(args.ids, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputValidationError(f"cannot read token ids from {args.ids}: {err}") from err
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputValidationError(f"{args.ids}: expected integer ids of shape (B, N); got {ids.dtype} "
                                   f"{ids.shape}")
    validate_token_range(ids, config.model.vocab_size, where=str(args.ids))
    model.check_input_shape(ids)
    with jax.default_matmul_precision("highest"):
        logits = jax.jit(lambda m, x: m(x, inference=True))(model, jax.numpy.asarray(ids, jax.numpy.int32))
    out = Path(args.out)
    _save_npy_atomic(out, np.asarray(logits, np.float32))
    print(f"wrote logits {tuple(logits.shape)} to {out}")
    return 0


def cmd_import_torch(args: argparse.Namespace) -> int:
    from .converters.bridge import import_torch

    options = {k: v for k, v in dict(
        top_k=args.top_k, dropout=args.dropout, prime_bump_init=args.prime_bump_init,
        prime_bump_scale=args.prime_bump_scale, scattering_scale=args.scattering_scale,
        scattering_scale_warmup_steps=args.scattering_scale_warmup_steps, numerics=args.numerics,
        htt_phase_encoding=False if args.no_phase_encoding else None, ar_ssm_min_rank=args.ar_ssm_min_rank,
        ar_ssm_local_conv=args.ar_ssm_local_conv, expert_rank_ratio=args.expert_rank_ratio).items()
        if v is not None}
    path, config, layout = import_torch(args.src, args.out_dir, allow_code=args.allow_pickle_code,
                                        overwrite=args.overwrite, **options)
    print(f"imported {layout} checkpoint: vocab {config.vocab_size}, d_model {config.d_model}, "
          f"{config.n_layers} layers, n_seq {config.n_seq}, {config.num_experts} experts, top_k {config.top_k}, "
          f"numerics {config.numerics}, {config.param_dtype} -> {path}")
    return 0


def cmd_export_torch(args: argparse.Namespace) -> int:
    from .converters.bridge import export_torch

    path = export_torch(args.checkpoint, args.out, fmt=args.format)
    print(f"wrote {path}")
    return 0


def _print_report(report: dict) -> None:
    import json

    print(json.dumps(report, indent=2, default=str))


def cmd_convert_to_phase1(args: argparse.Namespace) -> int:
    from .converters.phase1_conversion import convert_checkpoint_to_phase1

    changes = {k: v for k, v in dict(htt_rank=args.htt_rank, ar_ssm_max_rank=args.ar_ssm_max_rank,
                                     ar_ssm_min_rank=args.ar_ssm_min_rank, lm_head=args.lm_head).items()
               if v is not None}
    if args.expert_rank_ratio is not None:
        # "none" turns a preset's low-rank experts off; anything else is checked by Phase1Config.
        changes["expert_rank_ratio"] = None if args.expert_rank_ratio.lower() == "none" else args.expert_rank_ratio
    _, report = convert_checkpoint_to_phase1(args.checkpoint, args.out_dir, preset=args.preset,
                                             numerics=args.numerics, **changes)
    _print_report(report)
    return 0


def cmd_convert_from_phase1(args: argparse.Namespace) -> int:
    from .converters.phase1_conversion import convert_checkpoint_from_phase1

    _, report = convert_checkpoint_from_phase1(args.checkpoint, args.out_dir, drop_ar_ssm=args.drop_ar_ssm)
    _print_report(report)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phase1-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (default: the main job on the embedded corpus)")
    train.add_argument("--config", help="run configuration YAML (model/training/data sections)")
    train.add_argument("--preset", help="built-in run preset: default, default-bpe, default-baseline, tiny, "
                       "tiny-phase1")
    train.add_argument("--steps", type=int, help="override training.steps (with --resume: extend the run)")
    train.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override any field, e.g. --set model.d_model=128 (repeatable)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a run from its newest intact checkpoint (bit-identical to no interruption)")
    train.add_argument("--init-from", metavar="CKPT_DIR",
                       help="start a new run from a checkpoint's model (a run, import-torch, convert-to-phase1); "
                            "--set model.numerics=native switches an imported reference model to native numerics")
    train.add_argument("--inject-fault", action="append", metavar="KIND@STEP",
                       help="testing aid: inject nan-loss, inf-grad, oom or kill at step STEP (repeatable)")
    train.set_defaults(func=cmd_train)

    logits = sub.add_parser("logits", help="evaluate a checkpoint on token ids")
    logits.add_argument("checkpoint", help="run directory or checkpoint directory")
    logits.add_argument("--ids", required=True, help=".npy file of integer token ids, shape (B, N)")
    logits.add_argument("--out", required=True, help="output .npy file for the float32 logits (B, N, V)")
    logits.set_defaults(func=cmd_logits)

    imp = sub.add_parser("import-torch", help="import a PyTorch ResNet-BK state dict into an Orbax checkpoint")
    imp.add_argument("src", help=".pt/.pth/.bin (torch.load, weights only) or .safetensors")
    imp.add_argument("out_dir", help="checkpoint directory to create")
    imp.add_argument("--top-k", type=int, help="experts per token (reference default 1)")
    imp.add_argument("--dropout", type=float, help="expert dropout (reference default 0.1)")
    imp.add_argument("--prime-bump-init", action="store_true", default=None, help="record prime_bump_init=True")
    imp.add_argument("--prime-bump-scale", type=float, help="reference default 0.02")
    imp.add_argument("--scattering-scale", type=float, help="reference default 0.1")
    imp.add_argument("--scattering-scale-warmup-steps", type=int, help="reference default 0")
    imp.add_argument("--numerics", choices=["reference", "native"], help="default: reference (exact parity)")
    imp.add_argument("--no-phase-encoding", action="store_true", help="HTT cores were built without phase")
    imp.add_argument("--ar-ssm-min-rank", type=int, help="AR-SSM min rank (not stored in state dicts)")
    imp.add_argument("--ar-ssm-local-conv", choices=["causal", "centered"], help="AR-SSM conv alignment")
    imp.add_argument("--expert-rank-ratio", type=float,
                     help="record this ratio for low-rank experts (default rank / d_model; must give the rank)")
    imp.add_argument("--allow-pickle-code", action="store_true",
                     help="load pickles that carry code (only for files you trust)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    imp.set_defaults(func=cmd_import_torch)

    exp = sub.add_parser("export-torch", help="write a checkpoint as a plain PyTorch state dict")
    exp.add_argument("checkpoint", help="run directory or checkpoint directory")
    exp.add_argument("out", help="output file (.pt or .safetensors)")
    exp.add_argument("--format", choices=["pt", "safetensors"], help="default: from the file suffix")
    exp.set_defaults(func=cmd_export_torch)

    to_p1 = sub.add_parser("convert-to-phase1", help="baseline checkpoint -> Phase 1, keeping the weights")
    to_p1.add_argument("checkpoint")
    to_p1.add_argument("out_dir")
    to_p1.add_argument("--preset", help="Phase 1 preset: 8gb, 10gb, 24gb, inference, max_quality, max_efficiency")
    to_p1.add_argument("--htt-rank", type=int)
    to_p1.add_argument("--ar-ssm-max-rank", type=int)
    to_p1.add_argument("--ar-ssm-min-rank", type=int)
    to_p1.add_argument("--lm-head", choices=["dense", "htt_tied"], help="htt_tied: head tied to the HTT embedding")
    to_p1.add_argument("--expert-rank-ratio", metavar="RATIO|none",
                       help="low-rank experts of rank round(RATIO * d_model) (SVD of the trained ones); none: dense")
    to_p1.add_argument("--numerics", choices=["reference", "native"], help="default: keep the checkpoint's")
    to_p1.set_defaults(func=cmd_convert_to_phase1)

    from_p1 = sub.add_parser("convert-from-phase1", help="Phase 1 checkpoint -> baseline (HTT expanded exactly)")
    from_p1.add_argument("checkpoint")
    from_p1.add_argument("out_dir")
    from_p1.add_argument("--drop-ar-ssm", action="store_true", help="remove AR-SSM layers (reports the change)")
    from_p1.set_defaults(func=cmd_convert_from_phase1)

    from .bench import build_parser as bench_arguments

    bench = sub.add_parser("bench", help="the guide's §6 benchmark: baseline vs Phase 1 presets (JSON, table, plot)")
    bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .trainer import TrainingInterrupted

    try:
        return args.func(args)
    except TrainingInterrupted as err:
        print(f"phase1-jax {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except (ValueError, CheckpointError, NumericalInstabilityError, VRAMExhaustedError) as err:  # input and run
        print(f"phase1-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
