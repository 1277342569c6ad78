"""Roofline benchmark of the Pallas kernels against their XLA baselines, all measured in one process on one card.

    python benchmarks/kernels.py [--out results.json] [--quick] [--only ar,bk,bkref,lns,train] [--sweep]

Measures, in this order: the copy bandwidth of the card (a large device-to-device elementwise copy, bytes read plus
bytes written), then for each op the XLA baselines and the kernels at the sizes of issue 4, and prints a table; the
JSON holds every number with the device, the date and the software versions.

Timing: the op is called K times inside one jitted function, on `sets` rotating input sets (together larger than
the L2 cache where the sizes allow), each call made to depend on the previous one through an optimization barrier
so that XLA can neither overlap nor fuse them; the per-call time is the slope (T(K2) - T(K1)) / (K2 - K1) of the
median wall times (host clock after block_until_ready) over many repetitions, which removes the dispatch and
synchronisation overhead of the jitted call. Inputs are random (never zeros).
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from phase1_jax.kernels import _pallas_backend

DATE = "2026-11-26"
# --smoke: tiny sizes and the Pallas interpreter, to check this script on a machine without a GPU (no timings).
SMOKE = False
# --no-baselines (iterating on a kernel): skip the slow XLA baselines; reported figures need them.
BASELINES = True


# --------------------------------------------------------------------------------------------------- timing

def _chain(fn, arg_sets, k):
    """A jitted function calling fn k times over the rotating arg sets, each call ordered after the previous."""

    def run(arg_sets):
        outs = []
        previous = None
        for i in range(k):
            args = arg_sets[i % len(arg_sets)]
            if previous is not None:
                previous, args = lax.optimization_barrier((previous, args))
            out = fn(*args)
            previous = jax.tree_util.tree_leaves(out)[0]
            outs.append(out)
        return outs

    return jax.jit(run)


def _wall(run, arg_sets, reps):
    jax.block_until_ready(run(arg_sets))  # compile and warm up
    jax.block_until_ready(run(arg_sets))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(run(arg_sets))
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


TRACE_ROOT = tempfile.mkdtemp(prefix="kernel_bench_trace_")
METHOD = {"last": "host"}
_LINE_NAMES_SHOWN = []


def _device_spans(run, arg_sets, runs=3):
    """Device time of each of `runs` runs: first kernel start to last kernel end on the GPU's stream lines of a
    jax.profiler trace (so host dispatch and synchronisation are excluded, gaps between kernels included)."""
    trace_dir = tempfile.mkdtemp(dir=TRACE_ROOT)
    jax.profiler.start_trace(trace_dir)
    try:
        for _ in range(runs):
            jax.block_until_ready(run(arg_sets))
            time.sleep(0.003)  # > 1 ms of idle GPU between runs separates them in the trace
    finally:
        jax.profiler.stop_trace()
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        return []
    data = jax.profiler.ProfileData.from_file(paths[-1])
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not _LINE_NAMES_SHOWN:
                _LINE_NAMES_SHOWN.append(True)
                print(f"  (trace lines of {plane.name}: {[ln.name for ln in plane.lines][:12]})", flush=True)
            if not line.name.lower().startswith("stream"):
                continue
            for event in line.events:
                # Copies are the profiler's and the host's; memsets are part of an op (zeroed counters, buffers).
                if "memcpy" in event.name.lower():
                    continue
                events.append((event.start_ns, event.start_ns + event.duration_ns))
    events.sort()
    groups = []
    for start, end in events:
        if groups and start - groups[-1][1] < 1e6:
            groups[-1][1] = max(groups[-1][1], end)
        else:
            groups.append([start, end])
    return [(end - start) * 1e-9 for start, end in groups]


def time_op(fn, arg_sets, *, k1=2, k2=8, reps=10):
    """Seconds per call of fn and a spread. Preferred: device time from a profiler trace of k2 chained calls
    (median of 3 runs, divided by k2). Fallback when no GPU trace is available: slope of median host wall times
    between k1 and k2 chained calls."""
    if SMOKE:
        k1, k2, reps = 1, 2, 2
    run2 = _chain(fn, arg_sets, k2)
    t2, all2 = _wall(run2, arg_sets, reps)
    spans = []
    if jax.default_backend() == "gpu":
        try:
            spans = _device_spans(run2, arg_sets)
        except Exception as error:  # report and fall back to host timing
            print(f"  (profiler trace failed: {type(error).__name__}: {error})", flush=True)
    if len(spans) == 3:
        METHOD["last"] = "device"
        return statistics.median(spans) / k2, (max(spans) - min(spans)) / k2
    METHOD["last"] = "host"
    t1, _ = _wall(_chain(fn, arg_sets, k1), arg_sets, reps)
    quarters = sorted(all2)
    return (t2 - t1) / (k2 - k1), (quarters[len(all2) * 3 // 4] - quarters[len(all2) // 4]) / (k2 - k1)


# ------------------------------------------------------------------------------------------------------ rows

ROWS: list[dict] = []


def record(op, shape, variant, seconds, spread, bytes_moved=None, copy_bw=None, baseline=None, note=""):
    row = dict(op=op, shape=shape, variant=variant, us=seconds * 1e6, spread_us=spread * 1e6, note=note,
               timing=METHOD["last"])
    if bytes_moved is not None and seconds > 0:
        row["bytes"] = bytes_moved
        row["tb_s"] = bytes_moved / seconds / 1e12
        if copy_bw:
            row["pct_copy_bw"] = 100.0 * bytes_moved / seconds / copy_bw
    if baseline is not None:
        row["speedup_vs"] = {name: base / seconds for name, base in baseline.items()}
    ROWS.append(row)
    speed = ", ".join(f"{v:.2f}x {k}" for k, v in row.get("speedup_vs", {}).items())
    bw = f"{row['tb_s']:.2f} TB/s ({row['pct_copy_bw']:.0f}% copy)" if "pct_copy_bw" in row else ""
    print(f"  {op:10s} {shape:22s} {variant:34s} {row['us']:10.1f} us ±{row['spread_us']:6.1f}  {bw:24s} {speed}",
          flush=True)
    return seconds


def _random(rng, shape, dtype=jnp.float32, low=None, high=None):
    x = rng.uniform(low, high, shape) if low is not None else rng.standard_normal(shape)
    return jnp.asarray(x, dtype)


# ----------------------------------------------------------------------------------------------- copy bandwidth

def copy_bandwidth(quick):
    n = (1 << 16) if SMOKE else (1 << 26) if quick else (1 << 28)  # 256 MiB or 1 GiB of float32
    rng = np.random.default_rng(0)
    sets = [(_random(rng, (n,)),) for _ in range(2)]
    seconds, spread = time_op(lambda x: x + 1.0, sets, k1=2, k2=6, reps=5)
    bw = 2 * 4 * n / seconds
    ROWS.append(dict(op="copy", shape=f"{n} f32", variant="x + 1 (read + write)", us=seconds * 1e6,
                     spread_us=spread * 1e6, bytes=8 * n, tb_s=bw / 1e12, pct_copy_bw=100.0))
    print(f"  copy       {n:>12d} f32          read+write {8 * n / 2**30:.1f} GiB: {bw / 1e12:.3f} TB/s "
          f"({seconds * 1e6:.0f} us)", flush=True)
    return bw


# ------------------------------------------------------------------------------------------------------ AR-SSM

def _ar_fwd_bwd_bytes(u, v, g, ct):
    """Two elementwise passes with the AR scan's fwd+bwd traffic: read u, v, g, write one; read u, v, g, ct,
    write three (the barrier keeps XLA from merging them into one pass)."""
    out = u + v + g
    out, u, v, g, ct = lax.optimization_barrier((out, u, v, g, ct))
    return out, u * ct, v * ct, g * ct


def bench_ar(copy_bw, quick, sweep):
    from phase1_jax.kernels.ar_ssm_scan import ar_ssm_scan_reference, ar_ssm_scan_xla
    from phase1_jax.kernels.ar_ssm_scan.config import ArSsmScanConfig, default_config, describe
    from phase1_jax.kernels.ar_ssm_scan.pallas import ar_ssm_scan_pallas

    shapes = [(8, 4096, 32), (32, 8192, 128)] + ([] if quick else [(8, 65536, 32)])
    if SMOKE:
        shapes = [(2, 300, 8)]
    for batch, length, rank in shapes:
        shape = f"B={batch} L={length} r={rank}"
        elements = batch * length * rank
        sets_n = max(2, min(8, math.ceil(160e6 / (16 * elements))))  # > L2 where it fits in memory
        rng = np.random.default_rng(1)
        sets = [tuple(_random(rng, (batch, length, rank)) for _ in range(4)) for _ in range(sets_n)]
        fwd_sets = [s[:3] for s in sets]
        fwd_bytes, fb_bytes = 16 * elements, 44 * elements  # minimal: 3 in + 1 out; + 4 in + 3 out backward

        def fwd_bwd(fn):
            def run(u, v, g, ct):
                out, vjp = jax.vjp(fn, u, v, g)
                return (out, *vjp(ct))
            return run

        # Floors at this size: XLA elementwise fusions moving exactly the op's minimal bytes (launch and ramp
        # included), the fastest any kernel could be here.
        t, s = time_op(lambda u, v, g: u + v + g, fwd_sets)
        record("ar_ssm", shape, "floor: elementwise, fwd bytes", t, s, fwd_bytes, copy_bw)
        t, s = time_op(_ar_fwd_bwd_bytes, sets)
        record("ar_ssm", shape, "floor: elementwise, fwd+bwd bytes", t, s, fb_bytes, copy_bw)

        variants = {"xla (chunked, custom vjp)": ar_ssm_scan_xla, "reference (jnp cumsum)": ar_ssm_scan_reference}
        base_f, base_fb = {}, {}
        for name, fn in variants.items():
            t, s = time_op(fn, fwd_sets)
            base_f[name.split()[0]] = record("ar_ssm", shape, f"fwd {name}", t, s, fwd_bytes, copy_bw)
            t, s = time_op(fwd_bwd(fn), sets)
            base_fb[name.split()[0]] = record("ar_ssm", shape, f"fwd+bwd {name}", t, s, fb_bytes, copy_bw)

        configs = [None]
        if sweep:
            configs += [ArSsmScanConfig(block_t=bt, block_r=br, num_segments=seg, num_warps=w, backward_warps=bw)
                        for bt, br, seg, w, bw in [(64, 32, None, 4, 4), (128, 32, None, 4, 8),
                                                   (64, 16, 1, 4, 8), (32, 32, None, 2, 4),
                                                   (128, 32, None, 8, 8)]]
        for config in configs:
            label = describe(config or default_config(batch, length, rank), batch, length, rank)
            fn = functools.partial(ar_ssm_scan_pallas, config=config, interpret=SMOKE)
            t, s = time_op(fn, fwd_sets)
            record("ar_ssm", shape, f"fwd pallas {'default' if config is None else 'sweep'}", t, s, fwd_bytes,
                   copy_bw, base_f, note=label)
            t, s = time_op(fwd_bwd(fn), sets)
            record("ar_ssm", shape, f"fwd+bwd pallas {'default' if config is None else 'sweep'}", t, s, fb_bytes,
                   copy_bw, base_fb, note=label)


# ---------------------------------------------------------------------------------------------------------- BK

def _associative_scan_causal(a, z=1j):
    """The issue's baseline: lax.associative_scan over power-of-two normalised 2x2 complex Möbius matrices."""
    from phase1_jax.kernels.bk_scan import xla as bkx
    from phase1_jax.kernels.bk_scan.complex_planes import cdiv
    d_re, d_im = bkx._shifted_planes(a, jnp.complex64(z))
    coupling = jnp.concatenate([jnp.zeros_like(a[:, :1]), jnp.ones_like(a[:, 1:])], axis=1)
    zero, one = jnp.zeros_like(d_re), jnp.ones_like(d_re)
    # The exponent gets a leading axis of 1 so that every leaf scans along axis 2.
    leaves = bkx._normalise(jnp.stack([zero, zero, one, zero, -coupling, zero, d_re, d_im]),
                            jnp.zeros((1, *d_re.shape), jnp.int32))
    planes, _ = lax.associative_scan(bkx._compose, leaves, axis=2)
    g = lax.complex(*cdiv(planes[bkx._M01R], planes[bkx._M01I], planes[bkx._M11R], planes[bkx._M11I]))
    return jnp.stack([jnp.real(g), jnp.imag(g)], axis=-1)


def _associative_scan_complex_matmul(a, z=1j):
    """The issue's baseline as its text describes it: complex64 2x2 step matrices composed by jnp.matmul inside
    lax.associative_scan, each product divided by its largest |entry|. Matmul precision is the caller's (the issue
    measured XLA's default, TF32 on the GPU)."""
    d = a.astype(jnp.complex64) - jnp.complex64(z)
    coupling = jnp.concatenate([jnp.zeros_like(a[:, :1]), jnp.ones_like(a[:, 1:])], axis=1).astype(jnp.complex64)
    zero, one = jnp.zeros_like(d), jnp.ones_like(d)
    steps = jnp.stack([jnp.stack([zero, one], -1), jnp.stack([-coupling, d], -1)], -2)  # (B, N, 2, 2)

    def compose(earlier, later):
        product = jnp.matmul(later, earlier)
        return product / jnp.max(jnp.abs(product), axis=(-2, -1), keepdims=True)

    products = lax.associative_scan(compose, steps, axis=1)
    g = products[..., 0, 1] / products[..., 1, 1]
    return jnp.stack([jnp.real(g), jnp.imag(g)], axis=-1)


def _bk_baselines(shape, sets, grad_sets, copy_bw):
    """The XLA / lax compositions the kernels are compared with (causal, bidirectional, causal fwd+bwd)."""
    from phase1_jax.kernels.bk_scan import causal_scan_reference, xla as bkx

    batch, n = sets[0][0].shape
    minimal = 12 * batch * n
    base = {}
    with jax.default_matmul_precision("highest"):
        t, s = time_op(_associative_scan_causal, sets[:2], k1=1, k2=3, reps=5)
        base["assoc"] = record("bk_causal", shape, "fwd lax.associative_scan (issue)", t, s, minimal, copy_bw)
        t, s = time_op(_associative_scan_complex_matmul, sets[:2], k1=1, k2=3, reps=5)
        base["assoc_c64"] = record("bk_causal", shape, "fwd assoc. scan c64 matmul", t, s, minimal, copy_bw)
        t, s = time_op(bkx.causal_features, sets[:2], k1=1, k2=3, reps=5)
        base["xla"] = record("bk_causal", shape, "fwd xla (doubling scan)", t, s, minimal, copy_bw)
        if n <= 8192:
            t, s = time_op(causal_scan_reference, sets[:2], k1=1, k2=2, reps=3)
            base["lax.scan"] = record("bk_causal", shape, "fwd lax.scan sequential", t, s, minimal, copy_bw)
        t, s = time_op(bkx.bidirectional_features, sets[:2], k1=1, k2=3, reps=5)
        base_bi = {"xla": record("bk_bidir", shape, "fwd xla (doubling scan)", t, s, minimal, copy_bw)}
        t, s = time_op(lambda a, w: jax.vjp(bkx.causal_features, a)[1](w)[0], grad_sets[:2], k1=1, k2=3, reps=5)
        base_g = {"xla": record("bk_causal", shape, "fwd+bwd (vjp) xla", t, s, 32 * batch * n, copy_bw)}
    # The same composition at XLA's default precision, as the issue timed it (TF32 products on the GPU).
    t, s = time_op(_associative_scan_complex_matmul, sets[:2], k1=1, k2=3, reps=5)
    base["assoc_c64_tf32"] = record("bk_causal", shape, "fwd assoc. scan c64 matmul TF32", t, s, minimal,
                                    copy_bw)
    return base, base_bi, base_g


def bench_bk(copy_bw, quick, sweep):
    from phase1_jax.kernels.bk_scan.config import BkScanConfig, describe
    from phase1_jax.kernels.bk_scan.pallas import bidirectional_features_pallas, causal_features_pallas

    for batch, n in [(2, 300)] if SMOKE else [(16, 8192), (64, 65536)]:
        shape = f"B={batch} N={n}"
        rng = np.random.default_rng(2)
        sets_n = max(2, min(8, math.ceil(160e6 / (12 * batch * n))))
        sets = [(jnp.asarray(np.float32(-2.0) + rng.uniform(-3, 3, (batch, n)), jnp.float32),)
                for _ in range(sets_n)]
        grad_sets = [(s[0], _random(rng, (batch, n, 2))) for s in sets]
        z_sets = [(a, jnp.asarray(1j, jnp.complex64)) for (a,) in sets]
        minimal = 12 * batch * n  # read a (4 B), write G (8 B)
        t, s = time_op(lambda a: jnp.stack([a, a + 1.0], axis=-1), sets)
        record("bk", shape, "floor: elementwise, read a write G", t, s, minimal, copy_bw)

        # The kernels are timed before this shape's baselines and recorded after them (their speedups need the
        # baselines' times). Once a run has executed baselines (seconds of 1-33 ms calls), the same kernels
        # measured 0.5-1 us slower for the rest of the run on the H100 (docs/perf/NOTES.md, runs 14-16), so the
        # headline rows are timed again after the baselines and each run shows both.
        timed = []  # (op, variant, seconds, spread, bytes, baseline key, note)
        configs = [None]
        if sweep:
            configs += [BkScanConfig(scan_lanes=lanes, scan_vector=vector, scan_warps=warps,
                                     scan_chunks_per_program=per_program)
                        for lanes, vector, warps, per_program in [(32, 32, 1, 1), (32, 32, 1, 2), (32, 32, 1, 8),
                                                                  (32, 16, 1, 4), (32, 16, 1, 8), (64, 32, 2, 2),
                                                                  (64, 16, 2, 4)]]
        headline = {}
        for config in configs:
            label = describe(config or BkScanConfig(), batch, n)
            tag = "default" if config is None else "sweep"
            causal = functools.partial(causal_features_pallas, config=config, interpret=SMOKE)
            bidir = functools.partial(bidirectional_features_pallas, config=config, interpret=SMOKE)
            for op, fn in (("bk_causal", causal), ("bk_bidir", bidir)):
                timed.append((op, f"fwd pallas {tag}", *time_op(fn, sets), minimal, op, label))
                if config is None:
                    headline[op] = (fn, label)
            if config is None:
                # z as a run-time array (as in the models, where z is a buffer): one small XLA fusion per call
                # builds (Re z, Im z) for the kernels, which otherwise compile a Python z in.
                for op, fn in (("bk_causal", causal), ("bk_bidir", bidir)):
                    timed.append((op, "fwd pallas default, z array", *time_op(lambda a, z, fn=fn: fn(a, z=z), z_sets),
                                  minimal, op, label))
                # minimal bytes of forward + backward: read a, write G; read G and the cotangent, write grad a
                timed.append(("bk_causal", "fwd+bwd (vjp) pallas",
                              *time_op(lambda a, w: jax.vjp(causal, a)[1](w)[0], grad_sets), 32 * batch * n,
                              "bk_grad", label))

        base, base_bi, base_g = _bk_baselines(shape, sets, grad_sets, copy_bw) if BASELINES else ({}, {}, {})
        baselines = {"bk_causal": base, "bk_bidir": base_bi, "bk_grad": base_g}
        for op, variant, t, s, moved, key, note in timed:
            record(op, shape, variant, t, s, moved, copy_bw, baselines[key], note=note)
        if BASELINES:
            for op, (fn, label) in headline.items():
                t, s = time_op(fn, sets)
                record(op, shape, "fwd pallas, after baselines", t, s, minimal, copy_bw, baselines[op],
                       note=label)


def bench_bk_reference(copy_bw, quick, sweep):
    """Reference numerics (imported PyTorch models): the XLA doubling-scan path against the Pallas kernel."""
    from phase1_jax.kernels.bk_scan import xla as bkx
    from phase1_jax.kernels.bk_scan.pallas_torch_parity import reference_mode_features_pallas

    for batch, n in [(2, 300)] if SMOKE else [(16, 2048), (16, 8192)]:
        shape = f"B={batch} N={n}"
        rng = np.random.default_rng(4)
        sets = [(jnp.asarray(np.float32(-2.0) + rng.uniform(-3, 3, (batch, n)), jnp.float32),) for _ in range(4)]
        minimal = 12 * batch * n
        t, s = time_op(bkx.reference_mode_features, sets[:2], k1=1, k2=3, reps=5)
        base = {"xla": record("bk_reference", shape, "fwd xla (doubling scan)", t, s, minimal, copy_bw)}
        t, s = time_op(functools.partial(reference_mode_features_pallas, interpret=SMOKE), sets)
        record("bk_reference", shape, "fwd pallas default", t, s, minimal, copy_bw, base)


# --------------------------------------------------------------------------------------------------------- LNS

def bench_lns(copy_bw, quick, sweep):
    from phase1_jax.kernels.lns_matmul import to_lns, xla as lnsx
    from phase1_jax.kernels.lns_matmul.pallas import lns_matmul_pallas

    size = 64 if SMOKE else 1024 if quick else 2048
    shape = f"M=N=K={size}"
    rng = np.random.default_rng(3)
    a = _random(rng, (size, size))
    b = _random(rng, (size, size))
    la, sa = to_lns(a)
    lb, sb = to_lns(b)
    flops = 2 * size ** 3
    for name, dtype, precision in [("matmul f32 (highest)", jnp.float32, "highest"),
                                   ("matmul f32 (tf32)", jnp.float32, "tensorfloat32"),
                                   ("matmul bf16", jnp.bfloat16, "default")]:
        x, y = a.astype(dtype), b.astype(dtype)
        with jax.default_matmul_precision(precision):
            t, s = time_op(lambda x, y: x @ y, [(x, y)])
        record("lns", shape, name, t, s, note=f"{flops / t / 1e12:.1f} TFLOP/s")
    for algorithm in ("max_log", "exact"):
        xla_fn = lnsx.max_log_matmul if algorithm == "max_log" else lnsx.exact_matmul
        t_x, s = time_op(xla_fn, [(la, sa, lb, sb)], k1=1, k2=3, reps=5)
        record("lns", shape, f"{algorithm} xla (blocked)", t_x, s, note=f"{size ** 3 / t_x / 1e12:.2f} Tterm/s")
        fn = functools.partial(lns_matmul_pallas, algorithm=algorithm, interpret=SMOKE)
        t, s = time_op(fn, [(la, sa, lb, sb)])
        record("lns", shape, f"{algorithm} pallas", t, s, baseline={"xla": t_x},
               note=f"{size ** 3 / t / 1e12:.2f} Tterm/s")
    exact = np.asarray(lns_matmul_pallas(la, sa, lb, sb, algorithm="exact", interpret=SMOKE), np.float64)
    want = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    err = float(np.abs(exact - want).max() / np.abs(want).max())
    print(f"  lns exact pallas: relative error vs float64 matmul {err:.2e}")
    ROWS.append(dict(op="lns", shape=shape, variant="exact pallas accuracy", rel_err=err))


# -------------------------------------------------------------------------------------------------- train step

def bench_train(copy_bw, quick, sweep):
    """One Phase 1 training step with the kernels (GPU defaults) and with the XLA paths (defaults forced off)."""
    from phase1_jax.config import TrainConfig
    from phase1_jax.data import Batch
    from phase1_jax.phase1 import create_phase1_model
    from phase1_jax.train import create_train_state, make_train_step

    batch, seq = (2, 64) if SMOKE else (8, 1024)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 256, (batch, seq + 1)).astype(np.int32)
    data = Batch(inputs=jnp.asarray(tokens[:, :-1]), targets=jnp.asarray(tokens[:, 1:]))
    original = _pallas_backend.default_is_pallas
    steps = {}
    for label, use_kernels in [("kernels (GPU default)", True), ("xla paths", False)]:
        # The implementation is chosen when the step is traced: patch the default only around tracing/compiling.
        _pallas_backend.default_is_pallas = original if use_kernels else (lambda *args, **kwargs: False)
        try:
            model = create_phase1_model(vocab_size=256, d_model=256, n_layers=4, n_seq=seq, phase1="8gb", seed=0)
            train_cfg = TrainConfig(batch_size=batch, steps=100)
            graphdef, state, optimizer = create_train_state(model, train_cfg)
            step = make_train_step(graphdef, optimizer, model.config, train_cfg)
            state, _ = step(state, data)
            jax.block_until_ready(state)
            steps[label] = [step, state]
        finally:
            _pallas_backend.default_is_pallas = original
    # Interleaved rounds, so that clock ramps and host noise hit both variants alike.
    times = {label: [] for label in steps}
    for _ in range(1 if SMOKE else 4):
        for label, entry in steps.items():
            for _ in range(10):
                start = time.perf_counter()
                entry[1], metrics = entry[0](entry[1], data)
                jax.block_until_ready(metrics["loss"])
                times[label].append(time.perf_counter() - start)
    results = {}
    for label, samples in times.items():
        results[label] = statistics.median(samples)
        ordered = sorted(samples)
        record("train", f"B={batch} L={seq} d=256 4 layers", label, results[label],
               ordered[len(ordered) * 3 // 4] - ordered[len(ordered) // 4], note="phase1 preset 8gb, float32")
    print(f"  train step: xla / kernels = {results['xla paths'] / results['kernels (GPU default)']:.2f}x")


# ------------------------------------------------------------------------------------------------ ncu profile

def profile_run():
    """Each kernel op once more after a warm-up call, at the issue's sizes: run under Nsight Compute, e.g.
    ncu --metrics gpu__time_duration.sum,launch__registers_per_thread python benchmarks/kernels.py --profile
    to read the time of every launch (each BK phase, the AR-SSM segment pass) separately."""
    from phase1_jax.kernels.ar_ssm_scan.pallas import ar_ssm_scan_pallas
    from phase1_jax.kernels.bk_scan.pallas import causal_features_pallas

    rng = np.random.default_rng(9)
    for shape in [(8, 4096, 32), (32, 8192, 128)]:
        u, v, g, ct = (_random(rng, shape) for _ in range(4))
        fn = jax.jit(lambda u, v, g, ct: jax.vjp(ar_ssm_scan_pallas, u, v, g)[1](ct))
        for _ in range(2):
            jax.block_until_ready(fn(u, v, g, ct))
    for batch, n in [(16, 8192), (64, 65536)]:
        a = jnp.asarray(np.float32(-2.0) + rng.uniform(-3, 3, (batch, n)), jnp.float32)
        w = _random(rng, (batch, n, 2))
        fn = jax.jit(lambda a, w: jax.vjp(causal_features_pallas, a)[1](w))
        for _ in range(2):
            jax.block_until_ready(fn(a, w))


# -------------------------------------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="kernels_benchmark.json")
    parser.add_argument("--only", default="ar,bk,bkref,lns,train")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time a few block-size variants")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, Pallas interpreter: checks the script")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the slow XLA baselines (for sweeps while iterating; reported runs keep them)")
    parser.add_argument("--profile", action="store_true", help="only run each kernel twice (for ncu)")
    args = parser.parse_args(argv)
    global SMOKE, BASELINES
    SMOKE = args.smoke
    BASELINES = not args.no_baselines
    if args.profile:
        warnings.filterwarnings("ignore", message=_pallas_backend.TRITON_DEPRECATION, category=DeprecationWarning)
        profile_run()
        return 0
    warnings.filterwarnings("ignore", message=_pallas_backend.TRITON_DEPRECATION, category=DeprecationWarning)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, date {DATE}", flush=True)
    copy_bw = copy_bandwidth(args.quick)
    benches = {"ar": bench_ar, "bk": bench_bk, "bkref": bench_bk_reference, "lns": bench_lns, "train": bench_train}
    failures = {}
    def save():
        result = dict(device=device.device_kind, backend=jax.default_backend(), jax=jax.__version__, date=DATE,
                      copy_bandwidth_tb_s=copy_bw / 1e12, rows=ROWS, failures=failures,
                      timing="per row: 'device' = profiler-trace span of K chained calls / K (median of 3 runs); "
                         "'host' = slope of median wall times between K1 and K2 chained calls")
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for name in args.only.split(","):
        print(f"[{name}]", flush=True)
        try:
            benches[name](copy_bw, args.quick, args.sweep)
        except Exception as error:  # keep the other benchmarks; report the failure
            failures[name] = f"{type(error).__name__}: {error}"
            print(f"  FAILED: {failures[name][:2000]}", flush=True)
        save()  # after every section, so a run stopped at its time limit keeps what it measured
    print(f"\nwrote {args.out}")
    print(f"\n{'op':10s} {'shape':22s} {'variant':34s} {'us':>10s} {'TB/s':>6s} {'%copy':>6s}  speedups / note")
    for row in ROWS:
        if "us" not in row:
            continue
        speed = " ".join(f"{v:.1f}x{k}" for k, v in row.get("speedup_vs", {}).items())
        print(f"{row['op']:10s} {row['shape']:22s} {row['variant'][:34]:34s} {row['us']:10.1f} "
              f"{row.get('tb_s', float('nan')):6.2f} {row.get('pct_copy_bw', float('nan')):6.0f}  {speed} "
              f"{row.get('note', '')}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
