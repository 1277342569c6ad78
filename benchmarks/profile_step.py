"""Where a training step's device time goes, by model component.

Run it with `XLA_FLAGS=--xla_gpu_enable_command_buffer=` on a GPU: otherwise XLA replays each step as one CUDA
graph and the trace holds a single event per step (run 1 in docs/perf/PHASE1.md).

    python benchmarks/profile_step.py [--d-model 512 --n-layers 6 --n-seq 1024 --batch 8 --vocab 50257]
                                      [--variants baseline,phase1,...] [--out profile.json]

For each variant it compiles the real training step (`phase1_jax.train.make_train_step`, bf16 compute), times it
(median host wall time of chained steps, block_until_ready after each), then records a `jax.profiler` trace of a
few steps and attributes every GPU kernel to the model scope it came from. The attribution reads the `hlo_op` of
each kernel event and looks that instruction's `op_name` metadata up in the compiled HLO; the scopes are the
`jax.named_scope`s of the model and the step (embedding, ar_ssm, bk_core, moe, lm_head, cross_entropy,
stability, optimizer), each split into forward and backward ("transpose(" in the op name). Kernels without an
`hlo_op` (cuBLAS launched for a custom call, for instance) are attributed through the custom call's name when the
trace gives one, else counted as "unattributed".
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

SCOPES = ("stability", "optimizer", "cross_entropy", "lm_head", "embedding", "ar_ssm", "bk_core", "moe")


def _op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> metadata op_name, for every instruction of the compiled module."""
    out = {}
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"")
    for line in hlo_text.splitlines():
        m = pattern.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _scope_of(op_name: str) -> str:
    """The innermost-listed known scope of an op name. Scopes appear as `/name/` or wrapped by transformations,
    e.g. `jvp(ar_ssm)` and `transpose(jvp(lm_head))`; named scopes inside `jax.checkpoint` are dropped by JAX, so
    rematerialised blocks show up as `block (remat)`."""
    direction = "bwd" if "transpose(" in op_name else "fwd"
    for scope in SCOPES:
        if re.search(rf"[(/]{scope}[)/]", op_name) or op_name.endswith(f"/{scope}"):
            return f"{scope} {direction}" if scope not in ("optimizer", "stability") else scope
    if "checkpoint" in op_name or "remat" in op_name:
        return f"block (remat) {direction}"
    if "threefry" in op_name:
        return "rng"
    return f"other {direction}"


def _trace_kernels(run, steps: int) -> list[tuple[str, dict, float]]:
    trace_dir = tempfile.mkdtemp(prefix="profile_step_")
    jax.profiler.start_trace(trace_dir)
    try:
        for _ in range(steps):
            run()
    finally:
        jax.profiler.stop_trace()
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    data = jax.profiler.ProfileData.from_file(paths[-1])
    kernels = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue
            for event in line.events:
                if "memcpy" in event.name.lower():
                    continue
                kernels.append((event.name, dict(event.stats or {}), event.duration_ns * 1e-9))
    if not kernels:  # no GPU: the CPU thunks (checks this script's attribution on a machine without a GPU)
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    stats = dict(event.stats or {})
                    if "hlo_op" in stats:
                        kernels.append((event.name, stats, event.duration_ns * 1e-9))
    return kernels


def profile_variant(label, model_cfg, train_cfg, batch, steps=20, trace_steps=3):
    from phase1_jax.train import build_model, create_train_state, make_train_step

    model = build_model(model_cfg, seed=0)
    graphdef, state, optimizer = create_train_state(model, train_cfg)
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
    del model
    step = make_train_step(graphdef, optimizer, model_cfg, train_cfg)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    names = _op_names(compiled.as_text())
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    run()
    run()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    kernels = _trace_kernels(run, trace_steps)
    by_scope: dict[str, float] = collections.defaultdict(float)
    by_kernel: dict[str, float] = collections.defaultdict(float)
    scope_of_kernel: dict[str, str] = {}
    for name, stats, seconds in kernels:
        hlo_op = stats.get("hlo_op") or ""
        op_name = names.get(hlo_op, "")
        scope = _scope_of(op_name) if op_name else "unattributed"
        by_scope[scope] += seconds / trace_steps
        key = f"{hlo_op or name}"[:60]
        by_kernel[key] += seconds / trace_steps
        scope_of_kernel[key] = scope
    device_total = sum(by_scope.values())
    tokens = batch.inputs.size
    result = {
        "label": label, "params": n_params, "step_ms_median": median * 1e3,
        "tokens_per_s": tokens / median, "compile_s": compile_s, "device_ms_per_step": device_total * 1e3,
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "by_scope_ms": {k: v * 1e3 for k, v in sorted(by_scope.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": [(k, v * 1e3, scope_of_kernel[k])
                           for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:25]],
        "sample_stats": [sorted(s) for _, s, _ in kernels[:3]],
    }
    print(f"\n== {label}: {n_params / 1e6:.1f}M params, step {median * 1e3:.2f} ms "
          f"({tokens / median:,.0f} tok/s), device {device_total * 1e3:.2f} ms/step, compile {compile_s:.0f}s",
          flush=True)
    for scope, ms in result["by_scope_ms"].items():
        print(f"   {scope:22s} {ms:8.2f} ms  {100 * ms / max(device_total * 1e3, 1e-9):5.1f} %")
    print("   top kernels:")
    for k, ms, scope in result["top_kernels_ms"][:12]:
        print(f"     {ms:7.2f} ms  {scope:18s} {k}")
    return result


def _median_time(fn, *args, reps=30):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def micro_embeddings(vocab, d_model, tokens, rank=8):
    """Forward + backward of the token embedding alone: dense table gather vs HTT (current) vs HTT one-hot."""
    from flax import nnx

    from phase1_jax.models import htt as htt_mod

    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, vocab, (tokens,)).astype(np.int32))
    out = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        emb = htt_mod.HolographicTTEmbedding(vocab, d_model, rank=rank, rngs=nnx.Rngs(0))
        dims = emb._dims()
        V, D, v1, v2, d1, d2 = dims
        core1 = emb.core1[...].astype(dtype)
        core2 = emb.core2[...].astype(dtype)
        phase = emb.phase_shift[...].astype(dtype)
        table = jnp.asarray(rng.normal(size=(vocab, d_model)), dtype)
        ct = jnp.asarray(rng.normal(size=(tokens, d_model)), dtype)

        def htt_current(c1, c2, ph):
            return htt_mod._lookup(c1, c2, ph, ids, dims)

        def htt_onehot(c1, c2, ph):
            i1, i2 = ids // v2, ids % v2
            a = (c1[:, 0] * jnp.cos(ph)[:, None]).reshape(v1, -1)
            b = c2[:, :, 0].reshape(v2, -1)
            ga = (jax.nn.one_hot(i1, v1, dtype=a.dtype) @ a).reshape(-1, rank, d1)
            gb = (jax.nn.one_hot(i2, v2, dtype=b.dtype) @ b).reshape(-1, rank, d2)
            return jnp.einsum("trj,trk->tjk", ga, gb).reshape(-1, d1 * d2)[:, :D]

        def dense(t):
            return jnp.take(t, ids, axis=0)

        for label, fn, args in (("htt_current", htt_current, (core1, core2, phase)),
                                ("htt_onehot", htt_onehot, (core1, core2, phase)),
                                ("dense_gather", dense, (table,))):
            fwd_bwd = jax.jit(lambda *a, fn=fn: jax.vjp(fn, *a)[1](ct))
            fwd = jax.jit(fn)
            key = f"{label} {jnp.dtype(dtype).name}"
            out[key] = {"fwd_us": _median_time(fwd, *args) * 1e6, "fwd_bwd_us": _median_time(fwd_bwd, *args) * 1e6}
            print(f"   embedding V{vocab} D{d_model} T{tokens} {key:24s} fwd {out[key]['fwd_us']:8.1f} us  "
                  f"fwd+bwd {out[key]['fwd_bwd_us']:8.1f} us", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--n-seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--preset", default="8gb")
    parser.add_argument("--variants", default="baseline,phase1,phase1-nostab,phase1-nostab-noremat")
    parser.add_argument("--out", default="profile_step.json")
    parser.add_argument("--micro", action="store_true", help="also time the embedding alone (dense vs HTT)")
    parser.add_argument("--loss-chunk", type=int, default=None, help="training.loss_chunk_tokens of the Phase 1 rows")
    args = parser.parse_args(argv)

    from phase1_jax.config import ModelConfig, TrainConfig
    from phase1_jax.data import Batch
    from phase1_jax.phase1_config import get_preset_config

    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.batch, args.n_seq + 1)).astype(np.int32)
    batch = Batch(inputs=jnp.asarray(ids[:, :-1]), targets=jnp.asarray(ids[:, 1:]))
    base = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_seq=args.n_seq,
                       dropout=0.0)
    p1 = get_preset_config(args.preset)
    # Built on demand: an ablation that a preset's own settings forbid only fails its own row.
    variants = {
        "baseline": lambda: base,
        "phase1": lambda: base.replace(phase1=p1),
        "phase1-nostab": lambda: base.replace(phase1=p1.replace(stability_monitoring_enabled=False)),
        "phase1-nostab-noremat": lambda: base.replace(phase1=p1.replace(stability_monitoring_enabled=False,
                                                                          use_gradient_checkpointing=False)),
        "phase1-noar": lambda: base.replace(phase1=p1.replace(ar_ssm_enabled=False)),
        "phase1-nohtt": lambda: base.replace(phase1=p1.replace(htt_enabled=False, lm_head="dense")),
    }
    train_cfg = TrainConfig(batch_size=args.batch, steps=1000, compute_dtype="bfloat16", warmup_steps=10)
    phase1_train_cfg = train_cfg if args.loss_chunk is None else TrainConfig(
        batch_size=args.batch, steps=1000, compute_dtype="bfloat16", warmup_steps=10,
        loss_chunk_tokens=args.loss_chunk)
    device = jax.devices()[0]
    print(f"device {device.device_kind}, jax {jax.__version__}, shape d{args.d_model} L{args.n_layers} "
          f"N{args.n_seq} B{args.batch} V{args.vocab}", flush=True)
    results = []
    micro = {}
    if args.micro:
        micro = micro_embeddings(args.vocab, args.d_model, args.batch * args.n_seq)
    for label in [v for v in args.variants.split(",") if v]:
        try:
            cfg = train_cfg if label == "baseline" else phase1_train_cfg
            results.append(profile_variant(label, variants[label](), cfg, batch))
        except Exception as err:  # keep the other variants
            print(f"{label}: FAILED {type(err).__name__}: {str(err)[:1500]}", flush=True)
            results.append({"label": label, "error": f"{type(err).__name__}: {err}"})
        with open(args.out, "w") as fh:
            json.dump({"device": device.device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
                       "shape": vars(args), "variants": results, "micro": micro}, fh, indent=1)
    print(f"\n{'variant':26s} {'params':>8s} {'ms/step':>9s} {'tok/s':>10s}")
    for r in results:
        if "error" not in r:
            print(f"{r['label']:26s} {r['params'] / 1e6:7.1f}M {r['step_ms_median']:9.2f} {r['tokens_per_s']:10,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
