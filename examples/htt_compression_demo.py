"""Compress a trained embedding into HTT cores at several ranks (the guide's §3.1 and §10 `htt_compression_demo.py`).

    python examples/htt_compression_demo.py [--smoke] [--checkpoint RUN_OR_CKPT] [--out DIR]

Takes the token embedding of a trained baseline (a checkpoint you give, or one trained here on the embedded corpus
with a BPE tokenizer, so the table has thousands of rows), and for each rank r fits the HTT format with
`HolographicTTEmbedding.from_dense` (truncated SVD of the reshaped table: the best rank-r approximation,
Eckart-Young). Prints and plots the relative reconstruction error against the Eckart-Young bound, the parameter
count against the dense table's, and how much the model's validation loss moves when its table is replaced by the
approximation. Writes DIR/htt_compression.json and DIR/htt_compression.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from phase1_jax.checkpoint import load_checkpoint
from phase1_jax.models.common import split_model
from phase1_jax.models.htt import HolographicTTEmbedding
from phase1_jax.presets import run_preset
from phase1_jax.run import run_training


def trained_baseline(workdir: Path, smoke: bool) -> Path:
    """A small baseline trained on the embedded corpus with a BPE vocabulary (the table to compress)."""
    vocab = 1024 if smoke else 4096
    config = run_preset("default-baseline").with_overrides({
        "data.tokenizer": "bpe", "data.tokenizer_vocab_size": vocab, "model.vocab_size": vocab,
        "model.n_seq": 64, "model.n_layers": 2, "training.steps": 40 if smoke else 600,
        "training.eval_every": 20 if smoke else 200, "training.checkpoint_every": None})
    out = workdir / "baseline"
    run_training(config, out)
    return out


def validation_loss(run: Path, model) -> float | None:
    """The run's validation loss with `model` (None when the run's data cannot be rebuilt here)."""
    from phase1_jax.data import eval_batches
    from phase1_jax.run import _load_data
    from phase1_jax.train import evaluate, make_eval_step

    config, _ = load_checkpoint(run)
    data_cfg = config.data
    if (run / "tokenizer.json").exists():  # the run's own tokenizer, not a new one
        data_cfg = dataclasses.replace(data_cfg, tokenizer_path=str(run / "tokenizer.json"))
    try:
        data = _load_data(data_cfg, config.model.vocab_size, config.model.n_seq)
    except Exception:  # noqa: BLE001 - e.g. a token file that is not here
        return None
    batches = eval_batches(data.val, config.training.batch_size, config.model.n_seq, 4)
    graphdef, params, buffers = split_model(model)
    return evaluate(make_eval_step(graphdef), params, buffers, batches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes: under a minute on a CPU")
    parser.add_argument("--checkpoint", help="a baseline run or checkpoint whose token embedding to compress")
    parser.add_argument("--out", default="htt_compression", help="output directory")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.checkpoint) if args.checkpoint else trained_baseline(Path(tempfile.mkdtemp()), args.smoke)
    config, model = load_checkpoint(source)
    table = np.asarray(model.token_embedding.embedding[...], np.float64)
    vocab, d_model = table.shape
    base_loss = validation_loss(source, model)
    print(f"token embedding of {source}: {vocab} x {d_model} = {vocab * d_model:,} parameters; "
          f"validation loss {base_loss if base_loss is None else round(base_loss, 4)}")
    ranks = (1, 2, 4, 8, 16, 32) if args.smoke else (1, 2, 4, 8, 16, 32, 64, 128)
    rows = []
    print(f"  {'rank':>5s} {'parameters':>11s} {'of dense':>9s} {'rel. error':>11s} {'E-Y bound':>10s} "
          f"{'val loss':>9s}")
    for rank in ranks:
        htt, report = HolographicTTEmbedding.from_dense(table, rank, rngs=nnx.Rngs(0))
        _, params = htt.parameter_counts()
        model.token_embedding.embedding[...] = htt.to_dense().astype(model.token_embedding.embedding[...].dtype)
        loss = validation_loss(source, model)
        row = {"rank": rank, "parameters": params, "fraction_of_dense": params / (vocab * d_model),
               "relative_error": report["relative_error"], "eckart_young_bound": report["error_bound"],
               "val_loss": loss}
        rows.append(row)
        print(f"  {rank:5d} {params:11,d} {row['fraction_of_dense']:9.4f} {row['relative_error']:11.4f} "
              f"{row['eckart_young_bound']:10.4f} {'' if loss is None else f'{loss:9.4f}'}")
    model.token_embedding.embedding[...] = jax.numpy.asarray(table, model.token_embedding.embedding[...].dtype)
    result = {"source": str(source), "vocab_size": vocab, "d_model": d_model, "dense_parameters": vocab * d_model,
              "baseline_val_loss": base_loss, "rows": rows}
    (out / "htt_compression.json").write_text(json.dumps(result, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    r = [row["rank"] for row in rows]
    axes[0].plot(r, [row["relative_error"] for row in rows], "o-", label="HTT from_dense")
    axes[0].plot(r, [row["eckart_young_bound"] for row in rows], "k--", label="Eckart-Young bound")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("TT rank")
    axes[0].set_ylabel("relative Frobenius error")
    axes[0].legend()
    axes[1].plot([row["parameters"] for row in rows], [row["val_loss"] or np.nan for row in rows], "o-",
                 label="with the HTT table")
    if base_loss is not None:
        axes[1].axhline(base_loss, color="k", linestyle="--", label=f"dense ({vocab * d_model:,} parameters)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("embedding parameters")
    axes[1].set_ylabel("validation loss (nats)")
    axes[1].legend()
    fig.suptitle(f"HTT compression of a trained {vocab} x {d_model} token embedding")
    fig.tight_layout()
    fig.savefig(out / "htt_compression.png", dpi=100)
    print(f"wrote {out / 'htt_compression.json'} and {out / 'htt_compression.png'} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
