"""AR-SSM scan op (kernels/ar_ssm_scan): the XLA and Pallas implementations against the reference (values,
gradients), the bf16 error bound, long-sequence accuracy, the GPU-only checks, and the dispatcher.

Tiers as markers (tests/helpers.py): `interpret` and `bf16` run the Pallas kernels in the interpreter on a CPU
(compiled on a GPU); `gpu` runs the compiled kernels at full size. Kernel block sizes are small here so that every
case has at least three blocks of every kind (time tiles, rank blocks, segments) and odd lengths leave partial
blocks.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import IGNORE_TRITON_DEPRECATION, INTERPRET, KERNELS_RUN_HERE, ON_GPU, rel_err, single_line_naming
from phase1_jax.kernels import _pallas_backend
from phase1_jax.kernels.ar_ssm_scan import (IMPLEMENTATIONS, ar_ssm_scan, ar_ssm_scan_reference, ar_ssm_scan_xla,
                                            available_implementations, chunked_cumsum)
from phase1_jax.kernels.ar_ssm_scan.config import ArSsmScanConfig, layout
from phase1_jax.kernels.ar_ssm_scan.pallas import ar_ssm_scan_pallas

pytestmark = IGNORE_TRITON_DEPRECATION


def _inputs(shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(shape)
    v = rng.standard_normal(shape)
    g = rng.uniform(0.0, 1.0, shape)
    return tuple(jnp.asarray(a, dtype) for a in (u, v, g))


def ar_inputs(shape, dtype=jnp.float32, seed=0):
    """u, v, g and a cotangent (drawn in that order: other draws than `_inputs`)."""
    rng = np.random.default_rng(seed)
    u, v, ct = (rng.standard_normal(shape) for _ in range(3))
    g = rng.uniform(0.0, 1.0, shape)
    return tuple(jnp.asarray(x, dtype) for x in (u, v, g, ct))


def numpy_scan(u, v, g, reverse=False):
    u, v, g = (np.asarray(a, np.float64) for a in (u, v, g))
    a = u * g
    k = np.cumsum(a[:, ::-1], axis=1)[:, ::-1] if reverse else np.cumsum(a, axis=1)
    return k * (v * g)


# ------------------------------------------------------------------------------------------------ XLA path

# 1031 = 4 full chunks of 256 + an odd tail; 37 with chunk 8 exercises many small chunks.
@pytest.mark.parametrize("length,chunk,reverse", [(1, 256, False), (7, 256, True), (37, 8, False), (37, 8, True),
                                                  (1031, 256, False), (1031, 256, True)])
def test_xla_matches_reference_values_and_grads(length, chunk, reverse):
    u, v, g = _inputs((2, length, 5), seed=length)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal((2, length, 5)), jnp.float32)
    ref_fn = lambda *a: ar_ssm_scan_reference(*a, reverse=reverse)  # noqa: E731
    xla_fn = lambda *a: ar_ssm_scan_xla(*a, reverse=reverse, chunk_size=chunk)  # noqa: E731

    @jax.jit  # one compilation per case keeps the suite fast
    def run(u, v, g):
        grads = [jax.grad(lambda *a: jnp.sum(cot * fn(*a)), (0, 1, 2))(u, v, g) for fn in (ref_fn, xla_fn)]
        return ref_fn(u, v, g), xla_fn(u, v, g), grads

    ref, out, (ref_grads, xla_grads) = run(u, v, g)
    assert out.shape == u.shape and out.dtype == jnp.float32
    assert rel_err(out, ref) <= 2e-5
    assert rel_err(ref, numpy_scan(u, v, g, reverse)) <= 2e-5  # the reference is what it claims to be
    for got, want in zip(xla_grads, ref_grads):
        assert rel_err(got, want) <= 2e-5


def test_chunk_boundaries_are_exact_against_numpy():
    # Many chunks, an odd tail, reverse and forward.
    a = jnp.asarray(np.random.default_rng(3).standard_normal((3, 101, 2)), jnp.float32)
    for reverse in (False, True):
        want = np.cumsum(np.asarray(a, np.float64)[:, ::-1], 1)[:, ::-1] if reverse else np.cumsum(a, 1)
        got = jax.jit(lambda a: chunked_cumsum(a, reverse=reverse, chunk_size=4))(a)
        assert rel_err(got, want) <= 1e-6


def test_causal_and_reverse_dependence():
    u, v, g = _inputs((1, 600, 3))
    fwd = jax.jit(lambda u: ar_ssm_scan(u, v, g))
    rev = jax.jit(lambda u: ar_ssm_scan(u, v, g, reverse=True))
    base, base_rev = fwd(u), rev(u)
    t = 300
    u2 = u.at[:, t].add(1.0)
    out, out_rev = fwd(u2), rev(u2)
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert np.all(np.asarray(out[:, t:] != base[:, t:]).any(axis=-1))
    np.testing.assert_array_equal(out_rev[:, t + 1:], base_rev[:, t + 1:])
    assert np.all(np.asarray(out_rev[:, :t + 1] != base_rev[:, :t + 1]).any(axis=-1))


@pytest.mark.bf16
def test_bf16_error_bound_values_and_grads():
    u, v, g = _inputs((2, 600, 8), jnp.bfloat16, seed=5)
    cot = jnp.asarray(np.random.default_rng(6).standard_normal(u.shape), jnp.bfloat16)

    @jax.jit
    def run(u, v, g):
        f32 = [a.astype(jnp.float32) for a in (u, v, g)]
        exact = jax.grad(lambda *a: jnp.sum(cot.astype(jnp.float32) * ar_ssm_scan_reference(*a)), (0, 1, 2))(*f32)
        grads = [jax.grad(lambda *a: jnp.sum((cot * fn(*a)).astype(jnp.float32)), (0, 1, 2))(u, v, g)
                 for fn in (ar_ssm_scan_reference, ar_ssm_scan_xla)]
        return ar_ssm_scan_reference(u, v, g), ar_ssm_scan_xla(u, v, g), exact, grads

    ref, out, exact_grads, (ref_grads, xla_grads) = run(u, v, g)
    exact = numpy_scan(u, v, g)
    assert out.dtype == jnp.bfloat16
    ref_err = np.abs(np.asarray(ref, np.float64) - exact).max()
    xla_err = np.abs(np.asarray(out, np.float64) - exact).max()
    assert xla_err <= 1.5 * ref_err + 1e-6
    # Stronger: with float32 accumulation the only bf16 error left is the final rounding (unit roundoff 2^-8).
    out64 = np.asarray(out, np.float64)
    assert np.all(np.abs(out64 - exact) <= 2.0 ** -8 * np.abs(exact) + 1e-5 * np.abs(exact).max())
    assert all(x.dtype == jnp.bfloat16 for x in xla_grads)
    for got, ref_g, want in zip(xla_grads, ref_grads, exact_grads):
        want = np.asarray(want, np.float64)
        got_err = np.abs(np.asarray(got, np.float64) - want).max()
        ref_err = np.abs(np.asarray(ref_g, np.float64) - want).max()
        assert got_err <= 1.5 * ref_err + 1e-6


def test_long_sequence_float32_accuracy():
    length = 65_536
    rng = np.random.default_rng(7)
    # A drifting prefix sum (positive mean) is the hard case for float32 accumulation.
    u = jnp.asarray(rng.standard_normal((1, length, 4)) + 0.5, jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, length, 4)), jnp.float32)
    g = jnp.asarray(rng.uniform(0, 1, (1, length, 4)), jnp.float32)
    for reverse in (False, True):
        out = jax.jit(lambda u, v, g: ar_ssm_scan(u, v, g, reverse=reverse))(u, v, g)
        assert rel_err(out, numpy_scan(u, v, g, reverse)) <= 1e-5


# ---------------------------------------------------------------------------------------------- Pallas kernel

# 37 steps in tiles of 8 (5 tiles, the last partial), 5 rank columns in blocks of 2 (3 blocks, the last partial);
# segments: 3 (each with 2 tiles), or 1.
AR_CASES = [(ArSsmScanConfig(block_t=8, block_r=2, num_segments=3), False),
            (ArSsmScanConfig(block_t=8, block_r=2, num_segments=3), True),
            (ArSsmScanConfig(block_t=8, block_r=2, num_segments=1), False),
            (ArSsmScanConfig(block_t=8, block_r=2, num_segments=1), True)]


@pytest.mark.interpret
@pytest.mark.parametrize("config, reverse", AR_CASES)
def test_ar_ssm_values_and_grads_match_reference(config, reverse):
    u, v, g, ct = ar_inputs((2, 37, 5), seed=int(reverse) + 2 * (config.num_segments or 0))
    lay = layout(config, 2, 37, 5)
    assert lay.num_col_blocks >= 3 and -(-37 // config.block_t) >= 3

    @jax.jit
    def run(u, v, g, ct):
        out, vjp = jax.vjp(lambda *x: ar_ssm_scan_pallas(*x, reverse=reverse, config=config, interpret=INTERPRET),
                           u, v, g)
        ref, ref_vjp = jax.vjp(lambda *x: ar_ssm_scan_reference(*x, reverse=reverse), u, v, g)
        return out, vjp(ct), ref, ref_vjp(ct)

    out, grads, ref, ref_grads = run(u, v, g, ct)
    assert out.shape == u.shape and out.dtype == jnp.float32
    assert rel_err(out, numpy_scan(u, v, g, reverse)) <= 2e-5
    assert rel_err(out, ref) <= 2e-5
    for got, want in zip(grads, ref_grads):
        assert got.dtype == jnp.float32 and rel_err(got, want) <= 2e-5


@pytest.mark.bf16
def test_ar_ssm_bf16_error_is_bounded_by_the_reference_bf16_error():
    u, v, g, ct = ar_inputs((2, 300, 8), jnp.bfloat16, seed=5)
    config = ArSsmScanConfig(block_t=16, block_r=4, num_segments=3)

    @jax.jit
    def run(u, v, g, ct):
        kernel = lambda *x: ar_ssm_scan_pallas(*x, config=config, interpret=INTERPRET)  # noqa: E731
        out, vjp = jax.vjp(kernel, u, v, g)
        ref, ref_vjp = jax.vjp(ar_ssm_scan_reference, u, v, g)
        f32 = [x.astype(jnp.float32) for x in (u, v, g)]
        exact, exact_vjp = jax.vjp(ar_ssm_scan_reference, *f32)
        return out, vjp(ct), ref, ref_vjp(ct), exact, exact_vjp(ct.astype(jnp.float32))

    out, grads, ref, ref_grads, exact, exact_grads = run(u, v, g, ct)
    assert out.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in grads)
    # float32 accumulation: within 1.5x of the error the reference makes by rounding the answer... and far below.
    assert rel_err(out, exact) <= 1.5 * rel_err(ref, exact)
    assert rel_err(out, exact) <= 1e-2
    for got, want, exact_grad in zip(grads, ref_grads, exact_grads):
        assert rel_err(got, exact_grad) <= 1.5 * rel_err(want, exact_grad)


@pytest.mark.interpret
def test_ar_ssm_long_sequence_is_sound_in_float32():
    # L = 65,536 with a positive drift (partial sums grow like t): local tile sums plus compensated carries keep
    # the error under 1e-6 of max|ctx|; a plain sequential float32 cumsum (np.cumsum) is off by 2.8e-6 here.
    rng = np.random.default_rng(7)
    shape = (1, 65536, 2)
    u = jnp.asarray(rng.standard_normal(shape) + 0.5, jnp.float32)
    v = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    g = jnp.asarray(rng.uniform(0, 1, shape), jnp.float32)
    config = ArSsmScanConfig(block_t=256, block_r=2, num_segments=4)
    for reverse in (False, True):
        out = jax.jit(lambda u, v, g: ar_ssm_scan_pallas(u, v, g, reverse=reverse, config=config,
                                                         interpret=INTERPRET))(u, v, g)
        assert rel_err(out, numpy_scan(u, v, g, reverse)) <= 1e-6


# ----------------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("reverse", [False, True])
def test_ar_ssm_full_length_against_float64_and_xla_grads(reverse):
    rng = np.random.default_rng(1)
    shape = (2, 65536, 32)
    u = jnp.asarray(rng.standard_normal(shape) + 0.5, jnp.float32)
    v = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    g = jnp.asarray(rng.uniform(0, 1, shape), jnp.float32)
    ct = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    a = np.asarray(u, np.float64) * np.asarray(g, np.float64)
    k = np.cumsum(a[:, ::-1], 1)[:, ::-1] if reverse else np.cumsum(a, 1)
    exact = k * np.asarray(v, np.float64) * np.asarray(g, np.float64)

    def grads(fn):
        # Arrays as arguments: closed-over arrays would become HLO constants (slow to compile at this size).
        def run(u, v, g, ct):
            out, vjp = jax.vjp(lambda *x: fn(*x, reverse=reverse), u, v, g)
            return out, vjp(ct)
        return jax.jit(run)(u, v, g, ct)

    out, got = grads(ar_ssm_scan_pallas)
    again, _ = grads(ar_ssm_scan_pallas)
    _, want = grads(ar_ssm_scan_xla)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))  # no race: bit-identical reruns
    assert rel_err(out, exact) <= 1e-6
    for x, y in zip(got, want):
        assert rel_err(x, y) <= 1e-5


@pytest.mark.gpu
def test_ar_ssm_default_is_pallas_on_gpu():
    rng = np.random.default_rng(2)
    u, v, g = (jnp.asarray(rng.standard_normal((2, 1000, 16)), jnp.float32) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning for supported inputs
        default = ar_ssm_scan(u, v, g)
    np.testing.assert_array_equal(np.asarray(default), np.asarray(ar_ssm_scan_pallas(u, v, g)))


# ------------------------------------------------------------------------------------------------ dispatcher

def test_dispatch():
    u, v, g = _inputs((1, 9, 2))
    # The default: the kernel where it runs (a CUDA GPU >= sm_80), else the XLA path, silently on a CPU.
    default = ar_ssm_scan_pallas if KERNELS_RUN_HERE else ar_ssm_scan_xla
    np.testing.assert_array_equal(ar_ssm_scan(u, v, g), default(u, v, g))
    assert _pallas_backend.default_is_pallas("ar_ssm_scan") == KERNELS_RUN_HERE
    np.testing.assert_array_equal(ar_ssm_scan(u, v, g, implementation="reference"),
                                  ar_ssm_scan_reference(u, v, g))
    if KERNELS_RUN_HERE:
        np.testing.assert_array_equal(ar_ssm_scan(u, v, g, implementation="pallas"), ar_ssm_scan_pallas(u, v, g))
    else:
        with pytest.raises(NotImplementedError, match="pallas.*not available"):
            ar_ssm_scan(u, v, g, implementation="pallas")
    with pytest.raises(ValueError, match="implementation.*'triton'.*'xla'"):
        ar_ssm_scan(u, v, g, implementation="triton")
    with pytest.raises(ValueError, match="one shape"):
        ar_ssm_scan(u, v[:, :5], g)
    with pytest.raises(ValueError, match="chunk_size"):
        ar_ssm_scan(u, v, g, chunk_size=0)


def test_implementation_names():
    assert IMPLEMENTATIONS == (None, "xla", "reference", "pallas")
    assert available_implementations() == (("xla", "reference", "pallas") if KERNELS_RUN_HERE
                                            else ("xla", "reference"))


def test_explicit_pallas_fails_fast_where_the_kernels_cannot_run(pallas_unavailable):
    u, v, g, _ = ar_inputs((1, 9, 2))
    assert available_implementations() == ("xla", "reference")
    with pytest.raises(_pallas_backend.PallasUnavailableError, match="pallas.*not available.*CUDA GPU") as error:
        ar_ssm_scan(u, v, g, implementation="pallas")
    assert single_line_naming(str(error.value), "xla", "reference")
    with pytest.raises(NotImplementedError, match="interpret=True"):
        ar_ssm_scan_pallas(u, v, g)


def test_default_falls_back_once_where_the_kernels_cannot_run(gpu_backend, pallas_unavailable):
    u, v, g = _inputs((1, 9, 2))
    with pytest.warns(RuntimeWarning, match="ar_ssm_scan.*falls back from 'pallas' to 'xla'.*sm_80") as caught:
        out = ar_ssm_scan(u, v, g)
    assert [w.filename for w in caught] == [__file__]  # attributed to the caller of the op
    np.testing.assert_array_equal(out, ar_ssm_scan_xla(u, v, g))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ar_ssm_scan(u, v, g)  # once only


def test_default_falls_back_once_when_the_kernel_cannot_take_the_input(gpu_backend, pallas_available):
    # float64 (x64 mode): the kernel takes float32, bfloat16 and float16 only.
    with jax.enable_x64(True):
        u, v, g = (x.astype(jnp.float64) for x in _inputs((1, 9, 2)))
        with pytest.warns(RuntimeWarning, match="ar_ssm_scan.*falls back.*dtype float64"):
            out = ar_ssm_scan(u, v, g)
        assert out.dtype == jnp.float64
        np.testing.assert_array_equal(out, ar_ssm_scan_xla(u, v, g))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            ar_ssm_scan(u, v, g)


@pytest.mark.skipif(ON_GPU, reason="lowers for CUDA from a machine without a GPU")
def test_kernels_lower_to_triton_for_cuda(monkeypatch):
    # Catches Pallas -> Triton lowering errors (unsupported primitives, shapes) in CI without a GPU. jaxlib 0.10
    # embeds the Triton IR without compiling it; PTX compilation happens on the GPU (the `gpu` tests).
    monkeypatch.setattr(_pallas_backend, "require", lambda *args, **kwargs: None)
    f32 = jax.ShapeDtypeStruct((2, 300, 40), jnp.float32)

    def loss(u, v, g):
        return jnp.sum(ar_ssm_scan_pallas(u, v, g, reverse=True, config=ArSsmScanConfig(num_segments=4)))

    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(f32, f32, f32).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 4
