"""The traced jaxpr of every kernel entry point, forward and jax.vjp backward, one text file each: to show that a
refactoring of the kernels leaves what they compute unchanged.

    python benchmarks/trace_kernels.py OUT_DIR        # before and after the change, then: diff -r BEFORE AFTER

Covers every op (bk_scan, ar_ssm_scan, lns_matmul), implementation, mode and direction, the Pallas kernels both
compiled (interpret=False: traced, never lowered, so no GPU is needed) and interpreted, at shapes and block sizes
that take the kernels' branches (partial and full chunks, segments, couplings, Python and array z). The kernel
bodies are in the text (each pallas_call's jaxpr); object addresses are masked. Runs on a CPU in a few minutes.
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from phase1_jax.kernels import _pallas_backend

# Trace the compiled-kernel paths on a machine without a GPU: nothing is lowered or run here.
_pallas_backend.require = lambda *args, **kwargs: None

from phase1_jax.kernels.ar_ssm_scan import ar_ssm_scan, ar_ssm_scan_reference, ar_ssm_scan_xla  # noqa: E402
from phase1_jax.kernels.ar_ssm_scan.config import ArSsmScanConfig  # noqa: E402
from phase1_jax.kernels.ar_ssm_scan.pallas import ar_ssm_scan_pallas  # noqa: E402
from phase1_jax.kernels.bk_scan import bk_features  # noqa: E402
from phase1_jax.kernels.bk_scan.config import BkScanConfig  # noqa: E402
from phase1_jax.kernels.bk_scan.pallas import bidirectional_features_pallas, causal_features_pallas  # noqa: E402
from phase1_jax.kernels.bk_scan.pallas_torch_parity import (mobius_prefix_scan_pallas,  # noqa: E402
                                                            reference_mode_features_pallas)
from phase1_jax.kernels.lns_matmul import lns_matmul, to_lns  # noqa: E402
from phase1_jax.kernels.lns_matmul.config import LnsMatmulConfig  # noqa: E402
from phase1_jax.kernels.lns_matmul.pallas import lns_matmul_pallas  # noqa: E402

F32, C64, BF16 = jnp.float32, jnp.complex64, jnp.bfloat16


def spec(shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def text(fn, *args):
    # Object addresses (reprs of functions in primitive parameters) differ between processes.
    return re.sub(r"0x[0-9a-fA-F]+", "0x?", str(jax.make_jaxpr(fn)(*args)))


def forward_and_backward(fn, args, wrt, out_like):
    """(forward jaxpr, jaxpr of the vjp's backward) of fn(*args); `wrt` indexes the differentiated arguments."""
    def backward(*all_args):
        ct, inputs = all_args[-1], list(all_args[:-1])

        def partial(*diff):
            full = list(inputs)
            for i, x in zip(wrt, diff):
                full[i] = x
            return fn(*full)

        return jax.vjp(partial, *(inputs[i] for i in wrt))[1](ct)

    return text(fn, *args), text(backward, *args, out_like)


def bk_cases():
    small = BkScanConfig(chunk=8, vector=4, lanes=4, carry_rows=2, carry_vector=2, scan_lanes=4, scan_vector=4,
                         scan_chunks_per_program=2)
    wide = BkScanConfig(chunk=8, vector=4, lanes=4, carry_rows=2, carry_vector=2, scan_lanes=2, scan_vector=16)
    shapes = [("small", small, 3, 37), ("small-exact", small, 3, 32), ("wide", wide, 2, 41),
              ("default", None, 3, 1000), ("default-exact", None, 2, 1024), ("single", small, 2, 1)]
    kernels = [("causal", causal_features_pallas), ("bidirectional", bidirectional_features_pallas),
               ("torch-parity", reference_mode_features_pallas)]
    for (label, config, batch, n), (kname, kernel), interpret in itertools.product(shapes, kernels, (False, True)):
        a, out = spec((batch, n)), spec((batch, n, 2))
        bond, rows = spec((max(n - 1, 0),)), spec((batch, max(n - 1, 0)))
        variants = [("unit-pyz", lambda a: kernel(a, None, None, 1j, config=config, interpret=interpret), (a,)),
                    ("unit-arrayz", lambda a, z: kernel(a, None, None, z, config=config, interpret=interpret),
                     (a, spec((), C64))),
                    ("shared-pyz", lambda a, b: kernel(a, b, b, 0.3 + 0.8j, config=config, interpret=interpret),
                     (a, bond)),
                    ("rows-arrayz", lambda a, b, c, z: kernel(a, b, c, z, config=config, interpret=interpret),
                     (a, rows, bond, spec((), C64)))]
        for vname, fn, args in variants:
            name = f"bk-{kname}-{label}-{vname}-interpret{int(interpret)}"
            yield name, forward_and_backward(fn, args, (0,), out)
        if kname == "torch-parity":
            def scan(d_re, d_im, k):
                return mobius_prefix_scan_pallas(d_re, d_im, k, config=config, interpret=interpret)

            yield f"bk-prefix-scan-{label}-interpret{int(interpret)}", (text(scan, a, a, a),)
    for numerics, direction, implementation in itertools.product(("native", "reference"),
                                                                 ("causal", "bidirectional"),
                                                                 (None, "xla", "scan", "reference", "pallas")):
        fn = lambda a, b, c, z: bk_features(a, b, c, z, numerics=numerics, direction=direction,  # noqa: E731
                                            implementation=implementation)
        args = (spec((3, 37)), spec((36,)), spec((36,)), spec((), C64))
        yield (f"bk-api-{numerics}-{direction}-{implementation}",
               forward_and_backward(fn, args, (0,), spec((3, 37, 2))))


def ar_cases():
    configs = [("seg3", ArSsmScanConfig(block_t=8, block_r=2, num_segments=3), (2, 37, 5)),
               ("seg1", ArSsmScanConfig(block_t=8, block_r=2, num_segments=1), (2, 37, 5)),
               ("bf16cfg", ArSsmScanConfig(block_t=16, block_r=4, num_segments=3), (2, 300, 8)),
               ("default", None, (1, 1000, 40)), ("default-many", None, (64, 512, 64))]
    for (label, config, shape), reverse, dtype, interpret in itertools.product(configs, (False, True), (F32, BF16),
                                                                                (False, True)):
        fn = lambda u, v, g: ar_ssm_scan_pallas(u, v, g, reverse=reverse, config=config,  # noqa: E731
                                                interpret=interpret)
        x = spec(shape, dtype)
        name = f"ar-pallas-{label}-reverse{int(reverse)}-{jnp.dtype(dtype).name}-interpret{int(interpret)}"
        yield name, forward_and_backward(fn, (x, x, x), (0, 1, 2), x)
    for implementation, reverse, dtype in itertools.product((None, "xla", "reference", "pallas"), (False, True),
                                                            (F32, BF16)):
        x = spec((2, 37, 5), dtype)
        fn = lambda u, v, g: ar_ssm_scan(u, v, g, reverse=reverse, implementation=implementation)  # noqa: E731
        yield (f"ar-api-{implementation}-reverse{int(reverse)}-{jnp.dtype(dtype).name}",
               forward_and_backward(fn, (x, x, x), (0, 1, 2), x))
    for chunk in (4, 256):
        x = spec((2, 37, 5))
        fn = lambda u, v, g: ar_ssm_scan_xla(u, v, g, chunk_size=chunk)  # noqa: E731
        yield f"ar-xla-chunk{chunk}", forward_and_backward(fn, (x, x, x), (0, 1, 2), x)
    x = spec((2, 37, 5))
    yield "ar-reference", forward_and_backward(ar_ssm_scan_reference, (x, x, x), (0, 1, 2), x)


def lns_cases():
    a, b = spec((37, 29)), spec((29, 19))
    for algorithm, (label, config), interpret in itertools.product(
            ("max_log", "exact"), (("default", None), ("small", LnsMatmulConfig(block_m=16, block_n=8, block_k=8))),
            (False, True)):
        fn = lambda la, sa, lb, sb: lns_matmul_pallas(la, sa, lb, sb, algorithm=algorithm,  # noqa: E731
                                                      config=config, interpret=interpret)
        yield f"lns-pallas-{algorithm}-{label}-interpret{int(interpret)}", (text(fn, a, a, b, b),)
    for algorithm, implementation, block_k in itertools.product(("max_log", "exact"),
                                                                (None, "xla", "reference", "pallas"), (None, 3)):
        fn = lambda la, sa, lb, sb: lns_matmul(la, sa, lb, sb, algorithm=algorithm,  # noqa: E731
                                               implementation=implementation, block_k=block_k)
        yield f"lns-api-{algorithm}-{implementation}-blockk{block_k}", (text(fn, a, a, b, b),)
    yield "lns-to-lns", (text(to_lns, a),)


def main(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, texts in itertools.chain(bk_cases(), ar_cases(), lns_cases()):
        for part, body in zip(("fwd", "bwd"), texts):
            (out / f"{name}.{part}.txt").write_text(body + "\n")
            count += 1
    print(f"{count} jaxprs written to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
