"""Pallas kernels (AR-SSM scan, BK-Core scans, LNS matmul) against their references.

On a CPU the kernels run in the Pallas interpreter (interpret=True): the same kernel bodies, executed by XLA.
On a CUDA GPU the same tests run the compiled Triton kernels (tests/test_kernels_gpu.py adds long-sequence and
speed-independent GPU checks). Block sizes are small here so that every case has at least three blocks of every
kind (time tiles, rank blocks, segments, chunks, lanes) and odd lengths leave partial blocks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import elementwise_rel_err, rel_err  # noqa: E402
from phase1_jax.kernels import _pallas_backend
from phase1_jax.kernels.ar_ssm_scan import ar_ssm_scan, ar_ssm_scan_reference
from phase1_jax.kernels.ar_ssm_scan.config import ArSsmScanConfig, layout
from phase1_jax.kernels.ar_ssm_scan.pallas import ar_ssm_scan_pallas
from phase1_jax.kernels.bk_scan import (bidirectional_numpy, bidirectional_scan_reference, bk_features,
                                        causal_numpy, causal_scan_reference)
from phase1_jax.kernels.bk_scan.config import BkScanConfig
from phase1_jax.kernels.bk_scan.pallas import bidirectional_features_pallas, causal_features_pallas
from phase1_jax.kernels.lns_matmul import lns_matmul, reference as lns_reference, to_lns
from phase1_jax.kernels.lns_matmul.config import LnsMatmulConfig
from phase1_jax.kernels.lns_matmul.pallas import lns_matmul_pallas

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
pytestmark = pytest.mark.filterwarnings(f"ignore:{_pallas_backend.TRITON_DEPRECATION}:DeprecationWarning")




# ---------------------------------------------------------------------------------------------------- AR-SSM

def ar_inputs(shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    u, v, ct = (rng.standard_normal(shape) for _ in range(3))
    g = rng.uniform(0.0, 1.0, shape)
    return tuple(jnp.asarray(x, dtype) for x in (u, v, g, ct))


def numpy_scan(u, v, g, reverse):
    u, v, g = (np.asarray(x, np.float64) for x in (u, v, g))
    a = u * g
    k = np.cumsum(a[:, ::-1], axis=1)[:, ::-1] if reverse else np.cumsum(a, axis=1)
    return k * (v * g)


# 37 steps in tiles of 8 (5 tiles, the last partial), 5 rank columns in blocks of 2 (3 blocks, the last partial);
# segments: 3 (each with 2 tiles), or 1.
AR_CASES = [(ArSsmScanConfig(block_t=8, block_r=2, num_segments=3), False),
            (ArSsmScanConfig(block_t=8, block_r=2, num_segments=3), True),
            (ArSsmScanConfig(block_t=8, block_r=2, num_segments=1), False),
            (ArSsmScanConfig(block_t=8, block_r=2, num_segments=1), True)]


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


# ------------------------------------------------------------------------------------------------------- BK

# Forward: chunks of 4 lanes x 4 positions (N = 37: three chunks, the last partial); backward: chunks of 8.
# Forward chunks of 16 positions walked 2 per program: at N = 37 the second program of a row has one chunk past the end.
BK_CONFIG = BkScanConfig(chunk=8, vector=4, lanes=4, carry_rows=2, carry_vector=2, scan_lanes=4, scan_vector=4,
                         scan_chunks_per_program=2)
# 16 positions per lane: the lane products and states are renormalised inside a lane's block.
BK_WIDE = BkScanConfig(chunk=8, vector=4, lanes=4, carry_rows=2, carry_vector=2, scan_lanes=2, scan_vector=16)
BK_KERNELS_AND_ORACLES = [(causal_features_pallas, causal_numpy), (bidirectional_features_pallas, bidirectional_numpy)]


def bk_case(seed, batch=3, n=37, coupled=True):
    rng = np.random.default_rng(seed)
    a = (np.float32(-2.0) + rng.uniform(-3, 3, (batch, n))).astype(np.float32)
    if not coupled:
        return a, None, None
    b = rng.uniform(0.5, 1.5, n - 1).astype(np.float32)
    c = rng.uniform(0.5, 1.5, n - 1).astype(np.float32)
    return a, b, c


@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
@pytest.mark.parametrize("coupled", [False, True])
def test_bk_values_and_grads_match_references(direction, coupled):
    # N = 37 in chunks of 8 (5 chunks, the last partial), 3 rows: 15 lanes in programs of 4, carries 2 rows at a time.
    a, b, c = bk_case(11 + coupled, coupled=coupled)
    z = 0.25 + 1.0j
    kernel = causal_features_pallas if direction == "causal" else bidirectional_features_pallas
    scan = causal_scan_reference if direction == "causal" else bidirectional_scan_reference
    oracle = causal_numpy if direction == "causal" else bidirectional_numpy
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((*a.shape, 2)), jnp.float32)

    @jax.jit
    def run(a):
        out, vjp = jax.vjp(lambda x: kernel(x, b, c, z, config=BK_CONFIG, interpret=INTERPRET), a)
        ref, ref_vjp = jax.vjp(lambda x: scan(x, b, c, z), a)
        return out, vjp(weights)[0], ref_vjp(weights)[0]

    out, grad, ref_grad = run(jnp.asarray(a))
    assert out.shape == (*a.shape, 2) and out.dtype == jnp.float32
    assert elementwise_rel_err(out, oracle(a, b, c, z)) <= 1e-5
    assert rel_err(grad, ref_grad) <= 2e-5


def test_bk_long_sequence_accuracy_against_float64():
    # Random, growing and near-singular potentials (one row each) at z = i, and a band-edge row.
    n = 16384
    rng = np.random.default_rng(17)
    rows = [np.float32(-2.0) + rng.uniform(-3, 3, n),
            np.float32(-2.0) + np.linspace(0.0, 1000.0, n),
            np.full(n, -2.0) + rng.uniform(-1e-3, 1e-3, n),
            np.full(n, 2.0)]
    a = np.stack(rows).astype(np.float32)
    out = jax.jit(lambda a: causal_features_pallas(a, interpret=INTERPRET))(a)
    assert elementwise_rel_err(out, causal_numpy(a)) <= 1e-5
    out = jax.jit(lambda a: bidirectional_features_pallas(a, interpret=INTERPRET))(a)
    assert elementwise_rel_err(out, bidirectional_numpy(a)) <= 1e-5


@pytest.mark.parametrize("config", [BK_CONFIG, BK_WIDE], ids=["vector4", "vector16"])
def test_bk_single_step_and_huge_potentials(config):
    # N = 1 (one padded chunk) and |a| ~ 1e4, where the renormalisation bound of the config is reached: with 16
    # positions per lane, a product renormalised only once per block would overflow ((1e4)^16 > 3e38).
    a1 = np.array([[-1.5], [0.25]], np.float32)
    for kernel, oracle in BK_KERNELS_AND_ORACLES:
        out = kernel(a1, config=config, interpret=INTERPRET)
        assert elementwise_rel_err(out, oracle(a1)) <= 1e-6
        a = np.random.default_rng(5).uniform(-1e4, 1e4, (2, 41)).astype(np.float32)
        out = kernel(a, config=config, interpret=INTERPRET)
        assert np.all(np.isfinite(np.asarray(out)))
        assert elementwise_rel_err(out, oracle(a)) <= 1e-5


def test_bk_real_energy_with_a_padded_last_chunk():
    # z = 0 and N = 37 (the last forward chunk padded): the right sweep runs through the padding first, whose steps
    # must keep the state finite and non-zero for the first real step to discard it.
    a = (np.float32(-2.0) + np.random.default_rng(8).uniform(-3, 3, (2, 37))).astype(np.float32)
    for kernel, oracle in BK_KERNELS_AND_ORACLES:
        out = kernel(a, None, None, 0.0, config=BK_CONFIG, interpret=INTERPRET)
        assert np.all(np.isfinite(np.asarray(out)))
        assert rel_err(out, np.stack([oracle(a, None, None, 0.0).real, oracle(a, None, None, 0.0).imag], -1)) <= 1e-4


def _pallas_call_arities(closed_jaxpr):
    """Number of inputs of every pallas_call in a jaxpr, sub-jaxprs (jit, custom_vjp) included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append(len(eqn.invars))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(closed_jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("n", [32, 37], ids=["full-chunks", "padded"])
def test_bk_python_and_array_z_agree(n):
    # A Python z is compiled into the kernels, an array z is read at run time: same values, same gradients. At
    # N = 32 every forward chunk is full (unit coupling then runs with k = 1 on every step and no masks); at N = 37
    # the last one is padded.
    a = jnp.asarray(bk_case(21, n=n, coupled=False)[0])
    z = 0.3 + 0.8j
    weights = jnp.asarray(np.random.default_rng(4).standard_normal((*a.shape, 2)), jnp.float32)
    for kernel, oracle in BK_KERNELS_AND_ORACLES:
        def loss(a, z, kernel=kernel):
            return jnp.sum(kernel(a, None, None, z, config=BK_CONFIG, interpret=INTERPRET) * weights)

        out = kernel(a, None, None, z, config=BK_CONFIG, interpret=INTERPRET)
        assert elementwise_rel_err(out, oracle(np.asarray(a), None, None, z)) <= 1e-5
        array_out = kernel(a, None, None, jnp.asarray(z, jnp.complex64), config=BK_CONFIG, interpret=INTERPRET)
        assert rel_err(out, array_out) <= 1e-6
        if n == 32:  # gradients once (the padded geometry's are covered with a Python z above)
            static_grad = jax.jit(jax.grad(lambda a: loss(a, z)))(a)
            array_grad = jax.jit(jax.grad(loss))(a, jnp.asarray(z, jnp.complex64))
            assert rel_err(static_grad, array_grad) <= 1e-6
        # The prefix and values kernels of the Python-z call take one input (z) fewer; the carry kernel has none.
        static_arities = _pallas_call_arities(jax.make_jaxpr(lambda a: kernel(a, z=z, config=BK_CONFIG,
                                                                               interpret=INTERPRET))(a))
        array_arities = _pallas_call_arities(jax.make_jaxpr(lambda a, z: kernel(a, z=z, config=BK_CONFIG,
                                                                                 interpret=INTERPRET))(a, z))
        assert len(static_arities) == len(array_arities) == 3
        assert sum(array_arities) - sum(static_arities) == 2
        for bad in (None, True):
            with pytest.raises(ValueError, match="z must be a complex scalar"):
                kernel(a, z=bad, config=BK_CONFIG, interpret=INTERPRET)


@pytest.mark.parametrize("field, value", [("scan_lanes", 48), ("scan_lanes", 1), ("scan_vector", 12),
                                          ("scan_chunks_per_program", 3),
                                          ("scan_warps", 3), ("chunk", 6), ("lanes", 0)])
def test_bk_config_rejects_bad_block_sizes(field, value):
    with pytest.raises(ValueError, match=f"BkScanConfig.{field}"):
        BkScanConfig(**{field: value})


def test_bk_config_defaults_follow_the_sequence_length():
    # The sweep winners of docs/perf/NOTES.md (v6): 32 lanes x 16 at N = 8192, 32 lanes x 32 at N = 65,536.
    config = BkScanConfig()
    assert (config.scan_lanes_for(8192), config.scan_vector_for(8192), config.scan_warps_for(8192)) == (32, 16, 1)
    assert (config.scan_lanes_for(65536), config.scan_vector_for(65536)) == (32, 32)
    assert config.scan_lanes_for(1 << 20) == 128 and config.scan_warps_for(1 << 20) == 4
    assert BkScanConfig(scan_lanes=256).scan_warps_for(100) == 8
    # One chunk per program unless asked (v7 sweep); more than a row has are clipped by the kernels' geometry.
    assert config.scan_chunks_per_program == 1


def _matrix_scan_kernel(lanes, reverse):
    """A kernel scanning (4, lanes) real 2x2 matrices (rows m00, m01, m10, m11) across its lanes: later @ earlier."""
    def combine(earlier, later):
        e00, e01, e10, e11 = earlier
        l00, l01, l10, l11 = later
        return (l00 * e00 + l01 * e10, l00 * e01 + l01 * e11, l10 * e00 + l11 * e10, l10 * e01 + l11 * e11)

    def kernel(x_ref, o_ref):
        lane = jnp.arange(lanes)
        planes = tuple(_pallas_backend.load(x_ref.at[j, lane]) for j in range(4))
        for j, plane in enumerate(_pallas_backend.associative_scan(combine, planes, reverse=reverse)):
            _pallas_backend.store(o_ref.at[j, lane], plane)

    return _pallas_backend.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((4, lanes), jnp.float32), grid=(1,),
                                       num_warps=1 if lanes <= 32 else 4, num_stages=1, interpret=INTERPRET,
                                       name="matrix_scan_test")


@pytest.mark.parametrize("lanes", [8, 256])
@pytest.mark.parametrize("reverse", [False, True])
def test_associative_scan_keeps_the_order_of_a_non_commutative_combine(lanes, reverse):
    # The in-register lane scan of the BK kernels (one tt.scan when compiled). Matrix products do not commute, so
    # a combine applied in the wrong order (or a reverse scan read the wrong way) fails.
    # Rotations with a random shear: products stay O(1) over 256 factors, and no two factors commute.
    rng = np.random.default_rng(lanes)
    angle, shear = rng.uniform(0, 2 * np.pi, lanes), rng.uniform(-0.3, 0.3, lanes)
    x = np.stack([np.cos(angle) + shear, -np.sin(angle), np.sin(angle), np.cos(angle) - shear]).astype(np.float32)
    got = np.asarray(jax.jit(_matrix_scan_kernel(lanes, reverse))(x))
    mats = x.T.reshape(lanes, 2, 2).astype(np.float64)
    want, acc = np.zeros_like(mats), None
    for i in (range(lanes - 1, -1, -1) if reverse else range(lanes)):
        acc = mats[i] if acc is None else mats[i] @ acc
        want[i] = acc
    want = want.reshape(lanes, 4).T
    assert np.max(np.abs(got - want)) <= 1e-4 * np.abs(want).max()


# ------------------------------------------------------------------------------------------------------ LNS

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


# ------------------------------------------------------------------------------------------ dispatch, lowering

@pytest.mark.skipif(ON_GPU, reason="CPU dispatch behaviour")
def test_explicit_pallas_is_a_clear_error_on_cpu_and_defaults_stay_xla():
    u, v, g, _ = ar_inputs((1, 9, 2))
    with pytest.raises(_pallas_backend.PallasUnavailableError, match="pallas.*not available.*CUDA GPU"):
        ar_ssm_scan(u, v, g, implementation="pallas")
    with pytest.raises(NotImplementedError, match="interpret=True"):
        ar_ssm_scan_pallas(u, v, g)
    with pytest.raises(_pallas_backend.PallasUnavailableError, match="'xla'"):
        bk_features(np.zeros((1, 4), np.float32), None, None, 1j, numerics="native", implementation="pallas")
    la, sa = to_lns(np.ones((2, 3), np.float32))
    with pytest.raises(_pallas_backend.PallasUnavailableError):
        lns_matmul(la, sa, la.T, sa.T, implementation="pallas")
    assert not _pallas_backend.default_is_pallas("ar_ssm_scan")  # no warning either: XLA is the CPU default


def test_bk_sfu_reciprocals_only_where_they_were_measured_faster(monkeypatch):
    # Compiled bidirectional values kernels take their reciprocals as one rcp.approx.ftz.f32 each (1 µs faster on
    # the H100); the one-sided kernels keep the division (0.7 µs faster there), and the interpreter divides.
    monkeypatch.setattr(_pallas_backend, "require", lambda *args, **kwargs: None)
    a = jax.ShapeDtypeStruct((3, 1000), jnp.float32)

    def sfu_ops(kernel, interpret):
        return str(jax.make_jaxpr(functools.partial(kernel, interpret=interpret))(a)).count("rcp.approx.ftz.f32")

    assert sfu_ops(bidirectional_features_pallas, False) > 0
    assert sfu_ops(causal_features_pallas, False) == 0
    assert sfu_ops(bidirectional_features_pallas, True) == 0


@pytest.mark.skipif(ON_GPU, reason="lowers for CUDA from a machine without a GPU")
def test_every_kernel_lowers_to_triton_for_cuda(monkeypatch):
    # Catches Pallas -> Triton lowering errors (unsupported primitives, shapes) in CI without a GPU. jaxlib 0.10
    # embeds the Triton IR without compiling it; PTX compilation happens on the GPU (tests/test_kernels_gpu.py).
    monkeypatch.setattr(_pallas_backend, "require", lambda *args, **kwargs: None)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731

    def loss_ar(u, v, g):
        return jnp.sum(ar_ssm_scan_pallas(u, v, g, reverse=True, config=ArSsmScanConfig(num_segments=4)))

    def loss_bk(a, b):
        return jnp.sum(causal_features_pallas(a, b, b)) + jnp.sum(bidirectional_features_pallas(a))

    def lns(la, sa, lb, sb):
        return [lns_matmul_pallas(la, sa, lb, sb, algorithm=alg) for alg in ("max_log", "exact")]

    for fn, args, kernels in [(jax.grad(loss_ar, (0, 1, 2)), (f32(2, 300, 40),) * 3, 4),
                              # Causal: 3 forward + 3 backward kernels; bidirectional: its fused forward is dead code
                              # under grad, the backward recomputes both sides (3 + 3) and runs their backward (3 + 3).
                              (jax.grad(loss_bk), (f32(3, 1000), f32(999)), 18),
                              (bidirectional_features_pallas, (f32(3, 1000),), 3),
                              (lns, (f32(40, 30), f32(40, 30), f32(30, 20), f32(30, 20)), 2)]:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("triton") >= kernels
