"""The migration guide's §6 benchmark: the baseline against Phase 1 presets, measured in one run on one device.

    phase1-jax bench [--out DIR] [--parts throughput,capped,perplexity] [--smoke]
    python benchmarks/phase1.py ...                     (the same)

Three parts, each with the baseline measured in the same run:

* **throughput** (the guide's §6.2 setup by default: d_model 768, 12 layers, vocab 50,257, sequence 2048,
  batch 4, bf16 compute): for the baseline and each Phase 1 preset, the parameters (and where they are), the
  compiled step's peak device memory (XLA's buffer assignment: arguments + outputs + temporaries - donated
  aliases) and the training tokens/s, the median of interleaved rounds of chained steps (compilation excluded,
  steps dispatched asynchronously as the training loop does). Ablation rows isolate what each part costs.
  Micro-benchmarks time the HTT embedding against a dense table and the AR-SSM sub-layer against a dense d x d
  projection pair, forward + backward.
* **capped**: each model in a fresh process whose device memory is capped at the preset's `target_vram_gb`
  (8 GiB for `8gb`; XLA_PYTHON_CLIENT_MEM_FRACTION), at the largest batch that fits (chosen from the compiled
  step's memory analysis, then run for real): tokens/s and the measured peak there, and the measured peak at the
  common batch.
* **perplexity**: baseline and Phase 1 trained on the same tokens in the same order (the embedded corpus with
  the BPE tokenizer, the held-out split for validation), validation perplexity along the way.

Writes DIR/phase1_bench.json (device, date, versions, every figure), DIR/phase1_bench.md (tables) and
DIR/phase1_bench.png (tokens/s, memory and validation loss side by side). `--smoke` runs every part at tiny sizes
(on a CPU in about a minute; the capped part then only plans, since a CPU has no device memory to cap).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig, TrainConfig
from .errors import InputValidationError, InvalidConfigError
from .phase1_config import PRESETS, get_preset_config

GIB = 1024 ** 3
PARTS = ("throughput", "capped", "perplexity")


@dataclasses.dataclass(frozen=True)
class Shape:
    d_model: int = 768
    n_layers: int = 12
    n_seq: int = 2048
    batch: int = 4
    vocab: int = 50257

    def label(self) -> str:
        return f"d{self.d_model} L{self.n_layers} N{self.n_seq} B{self.batch} V{self.vocab}"


@dataclasses.dataclass(frozen=True)
class Row:
    """One model configuration of the benchmark: a preset (None = baseline) with Phase 1 overrides."""

    label: str
    preset: str | None
    overrides: tuple[tuple[str, Any], ...] = ()
    loss_chunk_tokens: int | None = None
    note: str = ""

    def model_config(self, shape: Shape, dropout: float = 0.0) -> ModelConfig:
        phase1 = None
        if self.preset is not None:
            phase1 = get_preset_config(self.preset).replace(**dict(self.overrides))
        return ModelConfig(vocab_size=shape.vocab, d_model=shape.d_model, n_layers=shape.n_layers,
                           n_seq=shape.n_seq, dropout=dropout, phase1=phase1)


LOSS_CHUNK = 2048
# The perplexity part holds out the last 10 % of the corpus (twice the training default) so that its validation
# split has a few dozen windows even at n_seq 512.
VAL_FRACTION = 0.1


def default_rows(presets: list[str], ablations: bool = True) -> list[Row]:
    rows = [Row("baseline", None, note="the reference's training: full logits, no rematerialisation"),
            Row("baseline + chunked loss", None, loss_chunk_tokens=LOSS_CHUNK,
                note="transparency row: the baseline with the loss chunking the Phase 1 memory presets use")]
    for name in presets:
        chunk = LOSS_CHUNK if PRESETS[name].lm_head == "htt_tied" else None
        rows.append(Row(name, name, loss_chunk_tokens=chunk, note="preset as shipped"))
        if name == "8gb" and ablations:
            rows += [Row("8gb, monitoring off", name, (("stability_monitoring_enabled", False),),
                         loss_chunk_tokens=chunk, note="ablation: the in-step stability metrics' cost"),
                     Row("8gb, experts stored", name, (("checkpoint_expert_hidden", False),),
                         loss_chunk_tokens=chunk, note="ablation: what recomputing the experts' hidden layers buys"),
                     Row("8gb + block remat", name, (("use_gradient_checkpointing", True),), loss_chunk_tokens=chunk,
                         note="ablation: per-block rematerialisation"),
                     Row("8gb, dense experts", name, (("expert_rank_ratio", None),), loss_chunk_tokens=chunk,
                         note="ablation: what low-rank experts buy")]
    return rows


# ---------------------------------------------------------------------------------------------- helpers

def _device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
            "jax": jax.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _random_batch(shape: Shape, seed: int = 0):
    from .data import Batch

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, shape.vocab, (shape.batch, shape.n_seq + 1)).astype(np.int32)
    return Batch(inputs=jnp.asarray(ids[:, :-1]), targets=jnp.asarray(ids[:, 1:]))


def _train_config(shape: Shape, row: Row, **changes) -> TrainConfig:
    return TrainConfig(**{**dict(batch_size=shape.batch, steps=1000, compute_dtype="bfloat16", warmup_steps=10,
                                 loss_chunk_tokens=row.loss_chunk_tokens), **changes})


def _peak_estimate(compiled) -> int | None:
    """Peak device bytes of one step from XLA's buffer assignment (donated inputs counted once)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)


def _measured_peak() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def device_memory_limit() -> int | None:
    """Bytes the device's allocator may use (None where the backend does not say, e.g. a CPU)."""
    return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def _is_oom(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _build(row: Row, shape: Shape, train_cfg: TrainConfig):
    """(model config, graphdef, state, jitted step, parameter breakdown) of one row."""
    from .phase1 import parameter_breakdown
    from .train import build_model, create_train_state, make_train_step

    cfg = row.model_config(shape)
    model = build_model(cfg, seed=0)
    params = parameter_breakdown(model)
    graphdef, state, optimizer = create_train_state(model, train_cfg)
    del model
    return cfg, state, make_train_step(graphdef, optimizer, cfg, train_cfg), params


def _chained_seconds(compiled, holder: dict, batch, steps: int) -> float:
    start = time.perf_counter()
    metrics = None
    for _ in range(steps):
        holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ throughput

def _time_in_loop(fn, x, iterations: int) -> float:
    """Seconds per iteration of x -> fn(x) chained `iterations` times inside one jitted loop (no host dispatch)."""
    loop = jax.jit(lambda x: jax.lax.fori_loop(0, iterations, lambda i, y: fn(y), x))
    jax.block_until_ready(loop(x))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(loop(x))
        samples.append((time.perf_counter() - start) / iterations)
    return statistics.median(samples)


def micro_benchmarks(shape: Shape, presets: list[str], iterations: int) -> list[dict[str, Any]]:
    """Forward + backward of the HTT embedding vs a dense table, and of the AR-SSM sub-layer vs a d x d pair."""
    from flax import nnx

    from .models.ar_ssm import AdaptiveRankSemiseparableLayer
    from .models.htt import HolographicTTEmbedding

    tokens = shape.batch * shape.n_seq
    d = shape.d_model
    bf16 = jnp.bfloat16
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, shape.vocab, (tokens,)).astype(np.int32))
    results = []

    def record(what, label, seconds, against=None):
        results.append({"what": what, "variant": label, "us": seconds * 1e6,
                        "ratio_to_dense": None if against is None else seconds / against})

    # Embedding: gradient of sum(E[ids] * w) with respect to the table (dense) or the cores (HTT).
    weight = jnp.asarray(rng.normal(size=(tokens, d)), bf16)
    table = jnp.asarray(rng.normal(size=(shape.vocab, d)) * 0.02, bf16)

    def dense_step(t):
        grad = jax.grad(lambda t: jnp.sum(jnp.take(t, ids, axis=0).astype(jnp.float32) * weight))(t)
        return t - 1e-3 * grad

    dense_s = _time_in_loop(dense_step, table, iterations)
    record("embedding fwd+bwd", f"dense gather V{shape.vocab}", dense_s)
    for name in presets:
        rank = PRESETS[name].htt_rank
        emb = HolographicTTEmbedding(shape.vocab, d, rank=rank, rngs=nnx.Rngs(0))
        graphdef, state, rest = nnx.split(emb, nnx.Param, ...)
        state = jax.tree_util.tree_map(lambda x: x.astype(bf16), state)

        def htt_step(st, graphdef=graphdef, rest=rest):
            def loss(st):
                return jnp.sum(nnx.merge(graphdef, st, rest)(ids).astype(jnp.float32) * weight)
            grad = jax.grad(loss)(st)
            return jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, st, grad)

        record("embedding fwd+bwd", f"HTT rank {rank} ({name})", _time_in_loop(htt_step, state, iterations), dense_s)

    # Sub-layers on h (B, N, d): h + f(LayerNorm(h)), gradient with respect to h and the weights.
    h = jnp.asarray(rng.normal(size=(shape.batch, shape.n_seq, d)), bf16)
    w1 = jnp.asarray(rng.normal(size=(d, d)) / math.sqrt(d), bf16)
    w2 = jnp.asarray(rng.normal(size=(d, d)) / math.sqrt(d), bf16)

    def layer_norm(x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(((x32 - mean) ** 2).mean(-1, keepdims=True) + 1e-5)).astype(x.dtype)

    def pair_step(carry):
        x, a, b = carry

        def loss(x, a, b):
            y = x + (layer_norm(x) @ a) @ b
            return jnp.sum(y.astype(jnp.float32))
        gx, ga, gb = jax.grad(loss, argnums=(0, 1, 2))(x, a, b)
        return x - 1e-3 * gx, a - 1e-3 * ga, b - 1e-3 * gb

    pair_s = _time_in_loop(pair_step, (h, w1, w2), iterations)
    record("sub-layer fwd+bwd", "dense d x d projection pair", pair_s)
    for name in presets:
        p1 = PRESETS[name]
        layer = AdaptiveRankSemiseparableLayer(d, max_rank=p1.ar_ssm_max_rank, min_rank=p1.ar_ssm_min_rank,
                                               l1_regularization=p1.ar_ssm_l1_regularization, rngs=nnx.Rngs(0))
        graphdef, state, rest = nnx.split(layer, nnx.Param, ...)
        state = jax.tree_util.tree_map(lambda x: x.astype(bf16), state)

        def ar_step(carry, graphdef=graphdef, rest=rest):
            x, st = carry

            def loss(x, st):
                y, aux = nnx.merge(graphdef, st, rest)(layer_norm(x))
                return jnp.sum((x + y).astype(jnp.float32)) + aux["gate_l1_loss"]
            gx, gs = jax.grad(loss, argnums=(0, 1))(x, st)
            return x - 1e-3 * gx, jax.tree_util.tree_map(lambda p, g: p - (1e-3 * g).astype(p.dtype), st, gs)

        record("sub-layer fwd+bwd", f"AR-SSM rank {p1.ar_ssm_max_rank} ({name})",
               _time_in_loop(ar_step, (h, state), iterations), pair_s)
    for r in results:
        ratio = "" if r["ratio_to_dense"] is None else f"  {r['ratio_to_dense']:.2f}x dense"
        print(f"  {r['what']:20s} {r['variant']:32s} {r['us']:9.1f} us{ratio}", flush=True)
    return results


def throughput(shape: Shape, rows: list[Row], rounds: int, steps_per_round: int) -> list[dict[str, Any]]:
    batch = _random_batch(shape)
    built = []
    for row in rows:
        cfg, state, step, params = _build(row, shape, _train_config(shape, row))
        built.append({"row": row, "cfg": cfg, "state": state, "step": step, "params": params})

    def compile_one(entry):
        start = time.perf_counter()
        entry["compiled"] = entry["step"].lower(entry["state"], batch).compile()
        entry["compile_s"] = time.perf_counter() - start
        return entry

    # Compilation is host work: the rows compile side by side (XLA releases the GIL).
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, len(built))) as pool:
        list(pool.map(compile_one, built))
    limit = device_memory_limit()
    too_big = [(e["row"].label, _peak_estimate(e["compiled"])) for e in built
               if limit and (_peak_estimate(e["compiled"]) or 0) > limit]
    if too_big:  # refuse before running a single step
        raise InputValidationError(
            f"shape {shape.label()} does not fit the device's {limit / GIB:.1f} GiB: " + ", ".join(
                f"{label} needs {peak / GIB:.1f} GiB" for label, peak in too_big) + "; choose a smaller --shape")
    for entry in built:
        entry["holder"] = {"state": entry.pop("state")}
        _chained_seconds(entry["compiled"], entry["holder"], batch, 2)  # warm-up
        entry["samples"] = []
    # Interleaved rounds, so that clock and thermal drift hit every row alike.
    for _ in range(rounds):
        for entry in built:
            seconds = _chained_seconds(entry["compiled"], entry["holder"], batch, steps_per_round)
            entry["samples"].append(batch.inputs.size * steps_per_round / seconds)
    results = []
    for entry in built:
        row = entry["row"]
        results.append({
            "label": row.label, "preset": row.preset, "overrides": dict(row.overrides),
            "loss_chunk_tokens": row.loss_chunk_tokens, "note": row.note,
            "params": entry["params"], "peak_bytes_compiled": _peak_estimate(entry["compiled"]),
            "tokens_per_s": statistics.median(entry["samples"]), "tokens_per_s_rounds": entry["samples"],
            "compile_s": entry["compile_s"],
        })
        entry.clear()
    base = results[0]
    for r in results:
        r["speed_vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["memory_vs_baseline"] = (r["peak_bytes_compiled"] / base["peak_bytes_compiled"]
                                   if r["peak_bytes_compiled"] and base["peak_bytes_compiled"] else None)
        r["params_vs_baseline"] = r["params"]["total"] / base["params"]["total"]
        r["embed_head_params_vs_baseline"] = (r["params"]["embeddings_and_head"]
                                              / base["params"]["embeddings_and_head"])
        print(f"  {r['label']:26s} {r['params']['total'] / 1e6:8.1f}M params  "
              f"{(r['peak_bytes_compiled'] or 0) / GIB:6.2f} GiB  {r['tokens_per_s']:11,.0f} tok/s  "
              f"{r['speed_vs_baseline']:.2f}x speed  compile {r['compile_s']:.0f}s", flush=True)
    return results


# ---------------------------------------------------------------------------------------------- capped

def _capped_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a process whose device memory is capped: the common batch, then the largest batch that fits."""
    shape = Shape(**spec["shape"])
    row = Row(spec["label"], spec["preset"], tuple(spec["overrides"].items()), spec["loss_chunk_tokens"])
    cap = spec["cap_bytes"]
    out: dict[str, Any] = {"label": row.label, "cap_bytes": cap,
                           "bytes_limit": (jax.devices()[0].memory_stats() or {}).get("bytes_limit")}

    def compiled_at(batch_size):
        s = dataclasses.replace(shape, batch=batch_size)
        _, state, step, _ = _build(row, s, _train_config(s, row))
        batch = _random_batch(s)
        return step.lower(state, batch).compile(), state, batch

    def run(batch_size, rounds):
        compiled, state, batch = compiled_at(batch_size)
        holder = {"state": state}
        _chained_seconds(compiled, holder, batch, 2)
        rates = [batch.inputs.size * spec["steps_per_round"]
                 / _chained_seconds(compiled, holder, batch, spec["steps_per_round"]) for _ in range(rounds)]
        return statistics.median(rates), _peak_estimate(compiled)

    if not spec["enforced"]:
        out["common_batch"] = shape.batch
    else:
        try:
            rate, _ = run(shape.batch, 1)
            out.update(common_batch=shape.batch, common_batch_tokens_per_s=rate,
                       common_batch_peak_measured=_measured_peak())
        except Exception as err:  # noqa: BLE001 - an OOM here is a result, not a crash
            if not _is_oom(err):
                raise
            out.update(common_batch=shape.batch, common_batch_oom=True)
    # Peak estimates are close to linear in the batch: fit them at two sizes, then try the largest predicted fit.
    sizes = (shape.batch, 2 * shape.batch)
    estimates = [_peak_estimate(compiled_at(b)[0]) for b in sizes]
    slope = (estimates[1] - estimates[0]) / (sizes[1] - sizes[0])
    # 8 % of the cap is left for what buffer assignment does not see (cuBLAS workspaces, allocator slack).
    fit = int((0.92 * cap - (estimates[0] - slope * sizes[0])) // slope) if slope > 0 else shape.batch
    fit = min(fit, spec["max_batch"])
    out["planner"] = {"sizes": sizes, "peak_estimates": estimates, "predicted_largest_batch": fit}
    if not spec["enforced"]:
        return out  # no device memory to cap (a CPU): the plan is the result
    fit = max(fit, 1)
    # Each try compiles a step: step down by one twice, then by quarters.
    tries = sorted({fit, fit - 1, fit - 2, fit * 3 // 4, fit // 2, fit // 4, 1} - {0}, reverse=True)
    for batch_size in [b for b in tries if b >= 1]:
        try:
            rate, estimate = run(batch_size, spec["rounds"])
        except Exception as err:  # noqa: BLE001
            if not _is_oom(err):
                raise
            out.setdefault("oom_batches", []).append(batch_size)
            continue
        out.update(largest_batch=batch_size, tokens_per_s=rate, peak_bytes_compiled=estimate,
                   peak_bytes_measured=_measured_peak())
        break
    return out


def capped(shape: Shape, rows: list[Row], rounds: int, steps_per_round: int, on_row=None) -> list[dict[str, Any]]:
    """One fresh process per model, its device memory capped at the preset's target_vram_gb (8 GiB baseline)."""
    results = []
    total = None
    if jax.default_backend() == "gpu":
        # JAX preallocates 75 % of the device by default; bytes_limit tells how much that is.
        total = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / 0.75
    for row in rows:
        target_gb = PRESETS[row.preset].target_vram_gb if row.preset else 8.0
        cap = int(target_gb * GIB)
        spec = {"shape": dataclasses.asdict(shape), "label": row.label, "preset": row.preset,
                "overrides": dict(row.overrides), "loss_chunk_tokens": row.loss_chunk_tokens, "cap_bytes": cap,
                "rounds": rounds, "steps_per_round": steps_per_round, "enforced": bool(total),
                "max_batch": 64 * shape.batch}
        env = dict(os.environ)
        if total:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{cap / total:.5f}"
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "phase1_jax.bench", "--capped-worker", json.dumps(spec)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"label": row.label, "cap_bytes": cap, "error": proc.stderr[-3000:]})
            print(f"  {row.label}: capped worker failed:\n{proc.stderr[-3000:]}", flush=True)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["seconds"] = time.perf_counter() - start
        result["capped"] = bool(total)
        base = results[0] if results else result  # the first model is the baseline
        if "tokens_per_s" in result and "tokens_per_s" in base:
            result["speed_vs_baseline"] = result["tokens_per_s"] / base["tokens_per_s"]
        results.append(result)
        if on_row is not None:
            on_row(results)
        print(f"  {row.label:26s} cap {cap / GIB:.1f} GiB: predicted largest batch "
              f"{result['planner']['predicted_largest_batch']}, ran {result.get('largest_batch')}, "
              f"{result.get('tokens_per_s', float('nan')):,.0f} tok/s, measured peak "
              f"{(result.get('peak_bytes_measured') or 0) / GIB:.2f} GiB", flush=True)
    return results


# ------------------------------------------------------------------------------------------ perplexity

def perplexity(shape: Shape, rows: list[Row], tokens_target: int, vocab_size: int, eval_points: int,
               learning_rate: float, on_row=None) -> dict[str, Any]:
    """Train each row on the same BPE-tokenised embedded-corpus batches; validation perplexity along the way."""
    from .data import BatchIterator, embedded_corpus_bytes, eval_batches, split_text
    from .tokenizer import BPETokenizer
    from .train import build_model, create_train_state, make_eval_step, make_train_step

    # The tokenizer learns from the training text only; the validation text is held out of both.
    train_text, val_text = split_text(embedded_corpus_bytes(), VAL_FRACTION, "the embedded corpus")
    tokenizer = BPETokenizer.train(train_text, vocab_size)
    train_tokens, val_tokens = tokenizer.encode(train_text), tokenizer.encode(val_text)
    shape = dataclasses.replace(shape, vocab=tokenizer.vocab_size)
    steps = math.ceil(tokens_target / (shape.batch * shape.n_seq))
    val_windows = max(1, (val_tokens.size - 1) // shape.n_seq)
    val = eval_batches(val_tokens, min(shape.batch, val_windows), shape.n_seq,
                       max(1, val_windows // min(shape.batch, val_windows)))
    eval_every = max(1, steps // eval_points)
    out = {"shape": dataclasses.asdict(shape), "steps": steps, "tokens_trained": steps * shape.batch * shape.n_seq,
           "tokenizer": tokenizer.describe(), "val_fraction": VAL_FRACTION, "train_tokens": int(train_tokens.size),
           "val_tokens": int(val_tokens.size), "val_windows": sum(b.inputs.shape[0] for b in val),
           "learning_rate": learning_rate, "rows": []}
    print(f"  BPE vocab {tokenizer.vocab_size}: {train_tokens.size:,} train / {val_tokens.size:,} validation tokens; "
          f"{steps} steps of {shape.batch}x{shape.n_seq}", flush=True)
    for row in rows:
        cfg = row.model_config(shape, dropout=0.1)
        train_cfg = TrainConfig(batch_size=shape.batch, steps=steps, learning_rate=learning_rate,
                                warmup_steps=max(1, steps // 20), compute_dtype="bfloat16",
                                loss_chunk_tokens=row.loss_chunk_tokens, eval_batches=len(val))
        model = build_model(cfg, seed=0)
        graphdef, state, optimizer = create_train_state(model, train_cfg)
        del model
        step_fn = make_train_step(graphdef, optimizer, cfg, train_cfg)
        eval_step = make_eval_step(graphdef)
        batches = BatchIterator(train_tokens, shape.batch, shape.n_seq, seed=0)
        curve = []
        start = time.perf_counter()
        for step in range(steps):
            state, metrics = step_fn(state, batches.batch_at(step))
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                losses = [float(eval_step(state.params, state.buffers, b)) for b in val]
                curve.append({"step": step + 1, "tokens": (step + 1) * shape.batch * shape.n_seq,
                              "train_loss": float(metrics["loss"]), "val_loss": float(np.mean(losses))})
        seconds = time.perf_counter() - start
        final = curve[-1]["val_loss"]
        best = min(c["val_loss"] for c in curve)
        out["rows"].append({"label": row.label, "preset": row.preset, "curve": curve, "final_val_loss": final,
                            "final_val_ppl": math.exp(final), "best_val_loss": best, "best_val_ppl": math.exp(best),
                            "train_seconds": seconds})
        print(f"  {row.label:26s} final val loss {final:.4f} (ppl {math.exp(final):.2f}), best {best:.4f} "
              f"(ppl {math.exp(best):.2f}), {seconds:.0f}s", flush=True)
        del state, step_fn
        base = out["rows"][0]
        out["rows"][-1]["final_ppl_vs_baseline"] = out["rows"][-1]["final_val_ppl"] / base["final_val_ppl"]
        out["rows"][-1]["best_ppl_vs_baseline"] = out["rows"][-1]["best_val_ppl"] / base["best_val_ppl"]
        if on_row is not None:
            on_row(out)
    return out


# ------------------------------------------------------------------------------------------------ report

def markdown(result: dict[str, Any]) -> str:
    info = result["info"]
    lines = [f"# Phase 1 benchmark ({info['device']}, {info['date']}, jax {info['jax']})", ""]
    for part, part_info in (result.get("part_info") or {}).items():
        lines.append(f"- {part}: measured on {part_info['device']}, {part_info['date']}")
    if result.get("part_info"):
        lines.append("")
    if result.get("throughput"):
        t = result["throughput"]
        lines += [f"## Same batch: {t['shape_label']}, bf16 compute", "",
                  "| model | params | embeddings + head | peak memory (compiled) | tokens/s | vs baseline: speed "
                  "| memory | params | embed+head |", "|---|---|---|---|---|---|---|---|---|"]
        for r in t.get("rows", []):
            lines.append(f"| {r['label']} | {r['params']['total'] / 1e6:.1f}M | "
                         f"{r['params']['embeddings_and_head'] / 1e6:.2f}M | "
                         f"{(r['peak_bytes_compiled'] or 0) / GIB:.2f} GiB | {r['tokens_per_s']:,.0f} | "
                         f"{r['speed_vs_baseline']:.2f}x | {r['memory_vs_baseline'] or float('nan'):.2f}x | "
                         f"{r['params_vs_baseline']:.2f}x | {r['embed_head_params_vs_baseline']:.3f}x |")
        lines += ["", "| micro-benchmark | variant | µs | vs dense |", "|---|---|---|---|"]
        for m in t.get("micro", []):
            ratio = "" if m["ratio_to_dense"] is None else f"{m['ratio_to_dense']:.2f}x"
            lines.append(f"| {m['what']} | {m['variant']} | {m['us']:.1f} | {ratio} |")
        lines.append("")
    if result.get("capped"):
        lines += ["## Under a device-memory cap, each at its largest batch", "",
                  "| model | cap | largest batch | tokens/s | vs baseline | measured peak | measured peak at the "
                  "common batch |", "|---|---|---|---|---|---|---|"]
        for r in result["capped"]:
            lines.append(f"| {r['label']} | {r['cap_bytes'] / GIB:.1f} GiB{'' if r.get('capped') else ' (not enforced)'}"
                         f" | {r.get('largest_batch')} | {r.get('tokens_per_s', float('nan')):,.0f} | "
                         f"{r.get('speed_vs_baseline', float('nan')):.2f}x | "
                         f"{(r.get('peak_bytes_measured') or 0) / GIB:.2f} GiB | "
                         f"{(r.get('common_batch_peak_measured') or 0) / GIB:.2f} GiB |")
        lines.append("")
    if result.get("perplexity"):
        p = result["perplexity"]
        s = p["shape"]
        lines += [f"## Perplexity: d{s['d_model']} L{s['n_layers']} N{s['n_seq']} B{s['batch']}, BPE vocab "
                  f"{p['tokenizer']['vocab_size']}, {p['tokens_trained']:,} training tokens "
                  f"({p['train_tokens']:,}-token training split, {p['val_tokens']:,}-token validation split)", "",
                  "| model | final val ppl | vs baseline | best val ppl | vs baseline |", "|---|---|---|---|---|"]
        for r in p["rows"]:
            lines.append(f"| {r['label']} | {r['final_val_ppl']:.2f} | {r['final_ppl_vs_baseline']:.3f}x | "
                         f"{r['best_val_ppl']:.2f} | {r['best_ppl_vs_baseline']:.3f}x |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    rows = (result.get("throughput") or {}).get("rows", [])
    labels = [r["label"] for r in rows]
    axes[0].barh(labels, [r["tokens_per_s"] for r in rows], color="tab:blue")
    for capped_row in result.get("capped") or []:
        if "tokens_per_s" in capped_row:
            axes[0].barh(f"{capped_row['label']} (cap, B={capped_row['largest_batch']})",
                         capped_row["tokens_per_s"], color="tab:orange")
    axes[0].set_xlabel("training tokens/s")
    axes[0].invert_yaxis()
    axes[1].barh(labels, [(r["peak_bytes_compiled"] or 0) / GIB for r in rows], color="tab:green")
    axes[1].set_xlabel("peak device memory per step (GiB)")
    axes[1].invert_yaxis()
    for r in (result.get("perplexity") or {}).get("rows", []):
        axes[2].plot([c["tokens"] / 1e6 for c in r["curve"]], [c["val_loss"] for c in r["curve"]], marker="o",
                     label=r["label"])
    axes[2].set_xlabel("training tokens (M)")
    axes[2].set_ylabel("validation loss (nats)")
    axes[2].legend()
    info = result["info"]
    fig.suptitle(f"Phase 1 vs baseline on {info['device']} ({info['date']})")
    fig.tight_layout()
    tmp = path.with_suffix(".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------- main

def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="phase1-jax bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench", help="output directory (default: bench/)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--presets", default="8gb,24gb,max_efficiency", help="Phase 1 presets to compare")
    parser.add_argument("--shape", default="768,12,2048,4,50257",
                        help="d_model,n_layers,n_seq,batch,vocab of the throughput part (default: guide §6.2)")
    parser.add_argument("--ppl-shape", default="768,12,512,16", help="d_model,n_layers,n_seq,batch of the "
                        "perplexity part (its vocab is the BPE tokenizer's)")
    parser.add_argument("--ppl-tokens", type=float, default=20e6, help="training tokens per model (default 20M)")
    parser.add_argument("--ppl-vocab", type=int, default=8192,
                        help="BPE vocabulary size (default 8192; the embedded corpus supports at most ~9,000)")
    parser.add_argument("--ppl-lr", type=float, default=6e-4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the whole benchmark on a CPU")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="measure nothing: combine the parts of earlier "
                        "runs' phase1_bench.json (later files win per part) and write the table and plot again")
    return parser


def _parse_shape(text: str, names: tuple[str, ...]) -> dict[str, int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != len(names) or min(values) < 1:
        raise InvalidConfigError("--shape", text, f"{len(names)} positive integers: {','.join(names)}")
    return dict(zip(names, values))


def merge(paths: list[str], out: Path) -> dict[str, Any]:
    """One report from several runs' JSON (a benchmark split over device sessions): each part from the last file
    that has it, each part keeping the device and date of its own run."""
    result: dict[str, Any] = {"merged_from": []}
    for path in paths:
        try:
            run_result = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InputValidationError(f"cannot read benchmark JSON {path}: {err}") from err
        result["merged_from"].append({"file": str(path), **run_result["info"]})
        result["info"] = run_result["info"]
        for part in PARTS:
            if run_result.get(part):
                result[part] = run_result[part]
                result.setdefault("part_info", {})[part] = run_result["info"]
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "phase1_bench.json", json.dumps(result, indent=1, default=str))
    _write_atomic(out / "phase1_bench.md", markdown(result))
    plot(result, out / "phase1_bench.png")
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.merge:
        return merge(args.merge, Path(args.out))
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise InvalidConfigError("--parts", args.parts, f"a comma-separated subset of {', '.join(PARTS)}")
    presets = [p for p in args.presets.split(",") if p]
    for name in presets:
        if name not in PRESETS:
            raise InvalidConfigError("--presets", name, f"Phase 1 presets: {', '.join(PRESETS)}")
    shape = Shape(**_parse_shape(args.shape, ("d_model", "n_layers", "n_seq", "batch", "vocab")))
    ppl_shape = Shape(**_parse_shape(args.ppl_shape, ("d_model", "n_layers", "n_seq", "batch")))
    rounds, steps_per_round, micro_iters = args.rounds, args.steps_per_round, 20
    ppl_tokens, ppl_vocab, eval_points = int(args.ppl_tokens), args.ppl_vocab, 10
    if args.smoke:
        shape = Shape(d_model=32, n_layers=1, n_seq=64, batch=2, vocab=1000)
        ppl_shape = Shape(d_model=32, n_layers=1, n_seq=64, batch=4)
        rounds, steps_per_round, micro_iters, ppl_tokens, ppl_vocab, eval_points = 2, 2, 2, 4 * 64 * 6, 512, 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputValidationError(f"cannot create output directory {out}: {err}") from err
    if jax.default_backend() == "gpu":
        # The capped workers compile the common-batch step again: a persistent cache makes that a lookup.
        cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                                             "phase1_bench_jax_cache")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    result: dict[str, Any] = {"info": _device_info(), "smoke": bool(args.smoke), "presets": presets,
                              "preset_configs": {p: get_preset_config(p).to_dict() for p in presets}}
    print(f"phase1-jax bench on {result['info']['device']} ({result['info']['date']}), parts: {', '.join(parts)}",
          flush=True)
    rows = default_rows(presets, ablations=not args.smoke)
    json_path, md_path, png_path = out / "phase1_bench.json", out / "phase1_bench.md", out / "phase1_bench.png"

    def save():
        _write_atomic(json_path, json.dumps(result, indent=1, default=str))
        _write_atomic(md_path, markdown(result))

    if "throughput" in parts:
        print(f"[throughput] {shape.label()}", flush=True)
        # The rows first: they refuse a shape that does not fit before anything is timed.
        result["throughput"] = {"shape": dataclasses.asdict(shape), "shape_label": shape.label(),
                                "rows": throughput(shape, rows, rounds, steps_per_round)}
        save()
        result["throughput"]["micro"] = micro_benchmarks(shape, [p for p in presets if PRESETS[p].htt_enabled],
                                                         micro_iters)
        save()
    for part in parts:
        if part == "capped":
            print("[capped] each model in its own memory-capped process", flush=True)
            capped_rows = [rows[0]] + [r for r in rows if r.preset == "8gb" and r.label == "8gb"]
            result["capped"] = capped(shape, capped_rows, max(2, rounds // 2), steps_per_round,
                                      on_row=lambda rows_so_far: (result.__setitem__("capped", rows_so_far), save()))
            save()
        if part == "perplexity":
            print(f"[perplexity] {ppl_tokens:,} tokens per model", flush=True)
            ppl_rows = [rows[0]] + [r for r in rows if r.label == "8gb"]

            def partial(out):  # a run stopped at a time limit keeps the rows it finished
                result["perplexity"] = out
                save()

            result["perplexity"] = perplexity(ppl_shape, ppl_rows, ppl_tokens, ppl_vocab, eval_points, args.ppl_lr,
                                              on_row=partial)
            save()
    plot(result, png_path)
    print("\n" + markdown(result))
    print(f"wrote {json_path}, {md_path}, {png_path}")
    return result


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--capped-worker"]:
        print(json.dumps(_capped_worker(json.loads(argv[1]))))
        return 0
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
