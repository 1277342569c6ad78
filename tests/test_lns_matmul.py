"""LNS matmul op (kernels/lns_matmul): the reference, XLA and Pallas implementations against their definitions
(max_log: the dominant term, ties to the smallest k; exact: A @ B), the GPU-only check, and the dispatcher.

The LNSLinear layer built on this op is tested in tests/test_lns.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (IGNORE_TRITON_DEPRECATION, INTERPRET, KERNELS_RUN_HERE, ON_GPU, lns_inputs, max_log_by_loops,
                     rel_err, single_line_naming)
from phase1_jax.kernels import _pallas_backend
from phase1_jax.kernels.lns_matmul import (IMPLEMENTATIONS, available_implementations, lns_matmul,
                                           reference as lns_reference, to_lns)
from phase1_jax.kernels.lns_matmul.config import LnsMatmulConfig
from phase1_jax.kernels.lns_matmul.pallas import lns_matmul_pallas

pytestmark = IGNORE_TRITON_DEPRECATION

# (implementation, block_k): block sizes that split K unevenly exercise the padding and the cross-block merge.
IMPLS = [("reference", None), ("xla", None), ("xla", 3)]


def random_operands(M, K, N, seed, zeros=0.15):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(M, K)).astype(np.float32)
    b = rng.normal(size=(K, N)).astype(np.float32)
    a[rng.random(a.shape) < zeros] = 0.0
    b[rng.random(b.shape) < zeros] = 0.0
    return a, b


def tie_operands():
    """Exact ties between terms of opposite sign: the smallest k must win, within and across K blocks."""
    a = np.array([[2.0, -4.0, 0.0, 1.0, 0.5],
                  [-0.5, 0.5, 3.0, 0.0, -3.0],
                  [0.0, 0.0, 0.0, 0.0, 0.0],  # an all-zero row
                  [0.0, 0.0, 0.0, -4.0, 4.0]], np.float32)
    b = np.array([[4.0, -1.0, 0.25],
                  [2.0, 1.0, 0.0],
                  [0.0, -2.0, 1.0],
                  [1.0, 6.0, 2.0],
                  [1.0, 1.0, -1.0 / 3.0]], np.float32)
    # (0, 0): terms +8 (k=0), -8 (k=1), 0, 1, 0.5 -> +8: log 2 + log 4 and log 4 + log 2 tie exactly
    # (1, 2): terms -0.125, 0, 3, 0, 1 -> +3
    # (3, 0): terms 0, 0, 0, -4 (k=3), +4 (k=4) -> -4; k=3 and k=4 sit in different blocks for block_k 1 and 2
    return a, b


@pytest.mark.parametrize("impl, block_k", [("reference", None), ("xla", None), ("xla", 1), ("xla", 2)])
def test_max_log_tie_rule_smallest_k(impl, block_k):
    a, b = tie_operands()
    la, sa, lb, sb = lns_inputs(a, b)
    out = np.asarray(lns_matmul(la, sa, lb, sb, algorithm="max_log", implementation=impl, block_k=block_k))
    np.testing.assert_allclose(out, max_log_by_loops(la, sa, lb, sb), rtol=2e-6, atol=0)
    assert out[0, 0] == pytest.approx(8.0, rel=1e-6)
    assert out[1, 2] == pytest.approx(3.0, rel=1e-6)
    assert out[3, 0] == pytest.approx(-4.0, rel=1e-6)
    assert np.all(out[2] == 0)  # only zero products


@pytest.mark.parametrize("impl, block_k", IMPLS)
@pytest.mark.parametrize("shape", [(3, 7, 5), (9, 13, 2)])
def test_max_log_matches_definition(impl, block_k, shape):
    a, b = random_operands(*shape, seed=sum(shape))
    a[0] *= -3.0  # a row of large negative-leaning values
    la, sa, lb, sb = lns_inputs(a, b)
    expected = max_log_by_loops(la, sa, lb, sb)
    out = np.asarray(lns_matmul(la, sa, lb, sb, algorithm="max_log", implementation=impl, block_k=block_k))
    assert out.dtype == np.float32 and out.shape == (shape[0], shape[2])
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=0)
    assert np.array_equal(np.sign(out), np.sign(expected))


@pytest.mark.parametrize("impl, block_k", IMPLS)
@pytest.mark.parametrize("shape", [(3, 7, 5), (17, 33, 9)])
def test_exact_matches_matmul(impl, block_k, shape):
    a, b = random_operands(*shape, seed=7 + sum(shape))
    truth = a.astype(np.float64) @ b.astype(np.float64)
    out = np.asarray(lns_matmul(*lns_inputs(a, b), algorithm="exact", implementation=impl, block_k=block_k))
    assert out.dtype == np.float32 and out.shape == truth.shape
    f32 = np.asarray(jnp.matmul(a, b, precision="highest"))
    scale = max(np.abs(truth).max(), 1e-30)
    assert np.abs(out - f32).max() <= 1e-5 * scale
    assert np.abs(out - truth).max() <= 1e-5 * scale


@pytest.mark.parametrize("algorithm", ["max_log", "exact"])
def test_one_by_one(algorithm):
    for a, b in ((2.0, -3.0), (0.0, 5.0), (-0.5, -4.0)):
        out = lns_matmul(*lns_inputs(np.array([[a]], np.float32), np.array([[b]], np.float32)), algorithm=algorithm)
        assert float(out[0, 0]) == pytest.approx(a * b, rel=1e-6)


def test_exact_all_zero_and_cancellation():
    a = np.array([[0.0, 0.0], [1.0, 1.0], [3.0, -3.0]], np.float32)
    b = np.array([[2.0, 0.0], [-2.0, 0.0]], np.float32)
    for impl in ("reference", "xla"):
        out = np.asarray(lns_matmul(*lns_inputs(a, b), algorithm="exact", implementation=impl, block_k=1))
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, a @ b, atol=1e-6)


def test_error_report_each_algorithm():
    a, b = random_operands(32, 64, 24, seed=3, zeros=0.0)
    truth = a.astype(np.float64) @ b.astype(np.float64)
    errors = {}
    for algorithm in ("max_log", "exact"):
        out = np.asarray(lns_matmul(*lns_inputs(a, b), algorithm=algorithm), np.float64)
        errors[algorithm] = np.linalg.norm(out - truth) / np.linalg.norm(truth)
        print(f"LNS {algorithm:8s} relative Frobenius error vs exact matmul (32x64 @ 64x24, N(0,1)): "
              f"{errors[algorithm]:.3e}")
    assert errors["exact"] < 1e-6
    assert errors["max_log"] > 0.1  # the dominant-term approximation is coarse on random data


def test_jit_and_to_lns():
    a, b = random_operands(4, 6, 3, seed=1)
    la, sa = to_lns(a)
    assert np.isneginf(np.asarray(la)[a == 0]).all() and np.all(np.asarray(sa)[a == 0] == 0)
    f = jax.jit(lambda a, b: lns_matmul(*to_lns(a), *to_lns(b), algorithm="exact"))
    np.testing.assert_allclose(np.asarray(f(a, b)), a @ b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- Pallas kernel

@pytest.mark.interpret
def test_lns_kernel_matches_reference_and_matmul():
    rng = np.random.default_rng(23)
    a = rng.standard_normal((37, 29)).astype(np.float32)
    b = rng.standard_normal((29, 19)).astype(np.float32)
    a[3, 4] = 0.0
    b[5, :] = 0.0
    a[7] = a[7, 0]  # ties inside a row of A
    la, sa = to_lns(a)
    lb, sb = to_lns(b)
    config = LnsMatmulConfig(block_m=16, block_n=8, block_k=8)  # 3 x 3 output tiles, 4 K blocks (last partial)
    max_log = lns_matmul_pallas(la, sa, lb, sb, algorithm="max_log", config=config, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(max_log), np.asarray(lns_reference.max_log_matmul(la, sa, lb, sb)))
    exact = lns_matmul_pallas(la, sa, lb, sb, algorithm="exact", config=config, interpret=INTERPRET)
    want = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    assert rel_err(exact, want) <= 1e-5


# ----------------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
def test_lns_exact_on_gpu_is_the_matmul():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((300, 200)).astype(np.float32)
    b = rng.standard_normal((200, 100)).astype(np.float32)
    out = lns_matmul(*to_lns(a), *to_lns(b), algorithm="exact")  # the GPU default: the kernel
    assert rel_err(out, np.asarray(a, np.float64) @ np.asarray(b, np.float64)) <= 1e-5


# ------------------------------------------------------------------------------------------------ dispatcher

def test_dispatcher_errors(pallas_unavailable):
    la, sa, lb, sb = lns_inputs(*random_operands(2, 3, 4, seed=0))
    with pytest.raises(ValueError, match="algorithm.*max_log.*exact"):
        lns_matmul(la, sa, lb, sb, algorithm="maxlog")
    with pytest.raises(ValueError, match="implementation.*xla"):
        lns_matmul(la, sa, lb, sb, implementation="triton")
    with pytest.raises(NotImplementedError, match="pallas.*not available"):
        lns_matmul(la, sa, lb, sb, implementation="pallas")
    with pytest.raises(ValueError, match="block_k"):
        lns_matmul(la, sa, lb, sb, block_k=0)
    with pytest.raises(ValueError, match="inner dimensions"):
        lns_matmul(la, sa, lb[:2], sb[:2])
    with pytest.raises(ValueError, match="sign"):
        lns_matmul(la, sa[:, :2], lb, sb)
    with pytest.raises(ValueError, match="2-D"):
        lns_matmul(la[0], sa[0], lb, sb)


def test_default_implementation():
    a, b = random_operands(5, 7, 3, seed=2)
    la, sa, lb, sb = lns_inputs(a, b)
    default = lns_matmul(la, sa, lb, sb, algorithm="exact")
    if KERNELS_RUN_HERE:
        want = lns_matmul_pallas(la, sa, lb, sb, algorithm="exact")
    else:
        want = lns_matmul(la, sa, lb, sb, algorithm="exact", implementation="xla")
    np.testing.assert_array_equal(np.asarray(default), np.asarray(want))


def test_implementation_names():
    # None first: LNSLinear validates its `implementation` against this tuple.
    assert IMPLEMENTATIONS == (None, "xla", "reference", "pallas")
    assert available_implementations() == (("xla", "reference", "pallas") if KERNELS_RUN_HERE
                                            else ("xla", "reference"))


def test_explicit_pallas_fails_fast_where_the_kernels_cannot_run(pallas_unavailable):
    la, sa = to_lns(np.ones((2, 3), np.float32))
    with pytest.raises(_pallas_backend.PallasUnavailableError) as error:
        lns_matmul(la, sa, la.T, sa.T, implementation="pallas")
    assert single_line_naming(str(error.value), "xla", "reference")
    with pytest.raises(NotImplementedError, match="interpret=True"):
        lns_matmul_pallas(la, sa, la.T, sa.T)


def test_default_falls_back_once_where_the_kernels_cannot_run(gpu_backend, pallas_unavailable):
    la, sa, lb, sb = lns_inputs(*random_operands(2, 3, 4, seed=0))
    with pytest.warns(RuntimeWarning, match="lns_matmul.*falls back from 'pallas' to 'xla'") as caught:
        out = lns_matmul(la, sa, lb, sb)
    assert [w.filename for w in caught] == [__file__]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(lns_matmul(la, sa, lb, sb, implementation="xla")))


@pytest.mark.skipif(ON_GPU, reason="lowers for CUDA from a machine without a GPU")
def test_kernels_lower_to_triton_for_cuda(monkeypatch):
    # As in tests/test_ar_ssm_scan.py: lowering errors caught without a GPU (IR embedded, not compiled).
    monkeypatch.setattr(_pallas_backend, "require", lambda *args, **kwargs: None)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731

    def lns(la, sa, lb, sb):
        return [lns_matmul_pallas(la, sa, lb, sb, algorithm=alg) for alg in ("max_log", "exact")]

    text = jax.jit(lns).trace(f32(40, 30), f32(40, 30), f32(30, 20), f32(30, 20)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 2
