"""The torch-parity BK-Core kernel (`bk_scan/pallas_torch_parity.py`, reference numerics) against the XLA path.

On a CPU the kernel runs in the Pallas interpreter (interpret=True); the tests at the end run the compiled Triton
kernel and are skipped unless a CUDA GPU >= sm_80 is there. Small block sizes give every small case at least three
chunks, several programs and a partial last chunk.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from phase1_jax.kernels import _pallas_backend
from phase1_jax.kernels.bk_scan import bk_features, reference_heuristic_grad, reference_mode_forward_numpy, resolve, xla
from phase1_jax.kernels.bk_scan.config import BkScanConfig
from phase1_jax.kernels.bk_scan.pallas_torch_parity import mobius_prefix_scan_pallas, reference_mode_features_pallas

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
pytestmark = pytest.mark.filterwarnings(f"ignore:{_pallas_backend.TRITON_DEPRECATION}:DeprecationWarning")

SMALL_CONFIG = BkScanConfig(chunk=8, vector=4, lanes=4, carry_rows=2, carry_vector=2)
# Stacked sweeps have 3B rows: bigger blocks keep the interpreter's program count (its cost) down.
FEATURES_CONFIG = BkScanConfig(chunk=16, vector=4, lanes=32, carry_rows=4, carry_vector=2)


def sweep_inputs(rng, rows, n, coupled, z=0.25 + 1j):
    d_re = (np.float32(-2.0) + rng.uniform(-3, 3, (rows, n)) - np.float32(z.real)).astype(np.float32)
    d_im = np.full((rows, n), -np.float32(z.imag), np.float32)
    coupling = rng.uniform(0.25, 2.25, (rows, n)) if coupled else np.ones((rows, n))
    coupling[:, 0] = 0.0
    return d_re, d_im, coupling.astype(np.float32)


def compare_prefix_states(got, want, tolerance):
    """Mantissas of both scans, brought to the XLA exponent, agree within `tolerance` (their scale is [0.5, 1))."""
    got, want = [np.asarray(x) for x in got], [np.asarray(x) for x in want]
    assert [x.dtype for x in got] == [np.float32] * 4 + [np.int32]
    assert all(x.shape == want[0].shape for x in got)
    exponent_gap = got[4].astype(np.int64) - want[4]
    # Same normalisation rule: equal exponents, except within rounding of a power of two.
    assert np.abs(exponent_gap).max() <= 1 and np.mean(exponent_gap == 0) > 0.99
    scale = np.exp2(exponent_gap.astype(np.float64))
    for got_plane, want_plane in zip(got[:4], want[:4]):
        assert np.abs(got_plane * scale - want_plane).max() <= tolerance
    largest = np.max([np.abs(x) for x in got[:4]], axis=0)
    assert largest.min() >= 0.5 and largest.max() < 1.0


def to_complex(features):
    f = np.asarray(features, np.float64)
    return f[..., 0] + 1j * f[..., 1]


def assert_same_features(got, want, rtol=1e-5):
    """Identical zero pattern (the cliff), values within rtol relative to each row's largest |G|."""
    got, want = to_complex(got), to_complex(want)
    np.testing.assert_array_equal(got == 0, want == 0)
    row_scale = np.maximum(np.abs(want).max(axis=-1, keepdims=True), 1e-30)
    assert np.max(np.abs(got - want) / row_scale) <= rtol


def constant_rows(values, n):
    return np.stack([np.full(n, np.float32(-2.0) + np.float32(v), np.float32) for v in values])


# ------------------------------------------------------------------------------------------ prefix states (a)

@pytest.mark.parametrize("rows, n, coupled", [(3, 37, True), (5, 129, False), (1, 8, True), (3, 1, False)])
def test_prefix_states_match_the_xla_scan(rows, n, coupled):
    # N = 37: 5 chunks of 8 (the last partial), 15 lanes in programs of 4; N = 129: 17 chunks; N = 8 and N = 1:
    # a single (full, or mostly padding) chunk.
    d_re, d_im, coupling = sweep_inputs(np.random.default_rng(n + coupled), rows, n, coupled)
    got = mobius_prefix_scan_pallas(d_re, d_im, coupling, config=SMALL_CONFIG, interpret=INTERPRET)
    compare_prefix_states(got, jax.jit(xla._mobius_prefix_scan)(d_re, d_im, coupling), 2e-6)


def test_prefix_states_with_huge_entries_stay_finite():
    # |a - z| + |k| ~ 1e4, the bound of the renormalisation schedule, with vector = 16 (two renormalisations per
    # vector-block): no entry overflows float32, exponents grow ~13 per step.
    rng = np.random.default_rng(9)
    d_re = rng.uniform(-7e3, 7e3, (3, 75)).astype(np.float32)
    d_im = np.full_like(d_re, -1.0)
    coupling = rng.uniform(-3e3, 3e3, (3, 75)).astype(np.float32)
    coupling[:, 0] = 0.0
    config = BkScanConfig(chunk=16, vector=16, lanes=4, carry_rows=2, carry_vector=2)
    got = mobius_prefix_scan_pallas(d_re, d_im, coupling, config=config, interpret=INTERPRET)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in got)
    assert np.asarray(got[4]).max() > 75 * 10
    compare_prefix_states(got, jax.jit(xla._mobius_prefix_scan)(d_re, d_im, coupling), 2e-6)


def test_prefix_states_long_rows_with_the_default_config():
    # The moderately sized interpreted case: N = 4,096 in the default chunking (64 chunks of 64 steps), where the
    # sequential and the doubling scans round differently over many steps.
    d_re, d_im, coupling = sweep_inputs(np.random.default_rng(4), 2, 4096, True)
    got = mobius_prefix_scan_pallas(d_re, d_im, coupling, interpret=INTERPRET)
    compare_prefix_states(got, jax.jit(xla._mobius_prefix_scan)(d_re, d_im, coupling), 5e-5)


# ------------------------------------------------------------------------------------------------ features (b)

def test_features_match_xla_below_the_cliff_with_nonuniform_bonds():
    rng = np.random.default_rng(21)
    a = (np.float32(-2.0) + rng.uniform(-3, 3, (3, 41))).astype(np.float32)
    b = rng.uniform(0.5, 1.5, (3, 40)).astype(np.float32)
    c = rng.uniform(0.5, 1.5, 40).astype(np.float32)
    for z in (1j, 0.5 + 0.25j):
        got = reference_mode_features_pallas(a, b, c, z, config=FEATURES_CONFIG, interpret=INTERPRET)
        assert got.shape == (3, 41, 2) and got.dtype == jnp.float32
        assert_same_features(got, xla.reference_mode_features(a, b, c, z))
        assert np.all(to_complex(got) != 0)


def test_single_site_and_two_sites():
    for a in (np.array([[-1.5], [0.25]], np.float32), np.array([[-1.5, 0.5]], np.float32)):
        got = reference_mode_features_pallas(a, config=FEATURES_CONFIG, interpret=INTERPRET)
        np.testing.assert_allclose(got, reference_mode_forward_numpy(a), rtol=1e-6, atol=0)


def test_overflow_cliff_straddled_by_constant_rows():
    # v = -3 is the first value whose rows are all zero at N = 446; v between -3.01 and -2.99 straddles the cliff.
    a = constant_rows(np.linspace(-3.01, -2.99, 6), 446)
    got = reference_mode_features_pallas(a, config=FEATURES_CONFIG, interpret=INTERPRET)
    want = xla.reference_mode_features(a)
    assert_same_features(got, want)
    zero_rows = np.all(np.asarray(got) == 0, axis=(1, 2))
    assert 0 < zero_rows.sum() < len(a)
    np.testing.assert_array_equal(zero_rows, np.all(reference_mode_forward_numpy(a) == 0, axis=(1, 2)))


def test_overflow_cliff_at_the_longest_table_length():
    """REFERENCE_SPEC 1.7: at N = 1338 constant rows are all zero for v <= 1 and v >= 3, and survive in between.

    The moderately sized interpreted case (default block sizes, 18 stacked rows of 1338: 21 chunks of 64)."""
    values = [0.999, 1.0, 1.001, 2.999, 3.0, 3.001]
    a = constant_rows(values, 1338)
    got = reference_mode_features_pallas(a, interpret=INTERPRET)
    assert_same_features(got, xla.reference_mode_features(a))
    zero_rows = np.all(np.asarray(got) == 0, axis=(1, 2))
    np.testing.assert_array_equal(zero_rows, [True, True, False, False, True, True])
    np.testing.assert_array_equal(zero_rows, np.all(reference_mode_forward_numpy(a) == 0, axis=(1, 2)))


# -------------------------------------------------------------------------------------------------- gradient (c)

def test_heuristic_gradient_is_the_xla_paths_backward():
    # A random row below the cliff and a constant row beyond it (G = 0: the 1/G^2 term hits the clamp), with large
    # cotangents at some positions so that the +-1000 clamp binds there too.
    rng = np.random.default_rng(5)
    n = 446
    a = np.concatenate([(np.float32(-2.0) + rng.uniform(-3, 3, (1, n))).astype(np.float32), constant_rows([-3.0], n)])
    b = rng.uniform(0.5, 1.5, n - 1).astype(np.float32)
    large = np.where(rng.uniform(size=(2, n, 1)) < 0.3, 5000.0, 1.0)
    weights = jnp.asarray(rng.standard_normal((2, n, 2)) * large, jnp.float32)

    def features_and_grad(kernel, **options):
        features, vjp = jax.vjp(lambda x: kernel(x, b, b, 1j, **options), a)
        return features, vjp(weights)[0]

    got_features, got = jax.jit(lambda: features_and_grad(reference_mode_features_pallas, config=FEATURES_CONFIG,
                                                          interpret=INTERPRET))()
    want_features, want = jax.jit(lambda: features_and_grad(xla.reference_mode_features))()
    # The backward is the XLA path's function of (G, cotangent), applied to the kernel's G...
    g = jax.lax.complex(got_features[..., 0], got_features[..., 1])
    np.testing.assert_array_equal(got, jax.jit(reference_heuristic_grad)(g, weights))
    assert np.all(np.asarray(want)[1] != 0)
    # ...and the heuristic (1/G^2 terms) magnifies the ~1e-6 differences in G to ~1e-3 here, no more.
    assert_same_features(got_features, want_features)
    np.testing.assert_allclose(got, want, rtol=3e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- dispatch (d)

@pytest.mark.skipif(ON_GPU, reason="CPU dispatch behaviour")
def test_explicit_pallas_is_a_clear_error_on_cpu_and_the_default_stays():
    a = np.zeros((1, 4), np.float32)
    with pytest.raises(_pallas_backend.PallasUnavailableError, match="'xla'"):
        bk_features(a, None, None, 1j, numerics="reference", implementation="pallas")
    with pytest.raises(_pallas_backend.PallasUnavailableError, match="interpret=True"):
        reference_mode_features_pallas(a)
    assert resolve("reference") is xla.reference_mode_features
    assert resolve("reference", implementation="xla") is xla.reference_mode_features


@pytest.mark.skipif(ON_GPU, reason="lowers for CUDA from a machine without a GPU")
def test_kernels_lower_to_triton_for_cuda(monkeypatch):
    # As tests/test_pallas_kernels.py: catches Pallas -> Triton lowering errors without a GPU (the IR is embedded,
    # not compiled: PTX compilation happens on the GPU, in the tests below).
    monkeypatch.setattr(_pallas_backend, "require", lambda *args, **kwargs: None)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)

    def loss(a, b):
        return jnp.sum(reference_mode_features_pallas(a, b, b) ** 2)

    text = jax.jit(jax.grad(loss)).trace(f32(3, 1000), f32(999)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 3
    for name in ("bk_reference_maps", "bk_reference_carry", "bk_reference_values"):
        assert name in text


# ---------------------------------------------------------------------------------------------------- on a GPU (e)

needs_gpu = pytest.mark.skipif(not _pallas_backend.available(), reason="needs a CUDA GPU >= sm_80")


@needs_gpu
def test_gpu_default_for_reference_numerics_is_the_kernel():
    assert resolve("reference") is reference_mode_features_pallas
    assert resolve("reference", implementation="pallas") is reference_mode_features_pallas


@needs_gpu
@pytest.mark.parametrize("n", [1000, 65536])
def test_gpu_prefix_states_match_the_xla_scan(n):
    rng = np.random.default_rng(n)
    d_re, d_im, coupling = sweep_inputs(rng, 3, n, True)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(xla._mobius_prefix_scan)(d_re, d_im, coupling)
    # Both scans drift from float64 by ~1e-4 of the mantissa scale at N = 65,536 (differently rounded), ~1e-6 at 1e3.
    compare_prefix_states(mobius_prefix_scan_pallas(d_re, d_im, coupling), want, 1e-5 if n <= 1000 else 5e-4)


@needs_gpu
def test_gpu_features_and_cliff_match_the_xla_path():
    # Rows: random potentials (zero beyond N ~ 1000), constant rows straddling the v = -3 cliff, and weakly coupled
    # rows (b = c = 0.1) whose determinants grow slowly enough to stay below 2**1024 for longer.
    rng = np.random.default_rng(12)
    for n in (446, 2048, 65536):
        a = np.concatenate([(np.float32(-2.0) + rng.uniform(-3, 3, (2, n))).astype(np.float32),
                            constant_rows([-3.005, -2.995], n),
                            rng.uniform(-0.1, 0.1, (2, n)).astype(np.float32)])
        for b in (None, np.full(n - 1, 0.1, np.float32)):
            got = bk_features(a, b, b, 1j, numerics="reference", implementation="pallas")
            assert_same_features(got, xla.reference_mode_features(a, b, b, 1j), rtol=1e-4)
            np.testing.assert_array_equal(got, reference_mode_features_pallas(a, b, b, 1j))


@needs_gpu
def test_gpu_weak_coupling_straddles_the_cliff_at_long_lengths():
    # With b = c = 0.1 and a ~ 0 the determinant grows by ~|d| = 1 per step: rows cross 2**1024 at long lengths.
    n = 65536
    # Final exponents ~932, 982, 1130, ... (XLA path): the first two rows survive, the others are all zero.
    scales = np.linspace(0.0, 0.4, 8, dtype=np.float32)
    a = (scales[:, None] * np.random.default_rng(3).uniform(-1, 1, (1, n))).astype(np.float32)
    b = np.full(n - 1, 0.1, np.float32)
    got = reference_mode_features_pallas(a, b, b, 1j)
    assert_same_features(got, xla.reference_mode_features(a, b, b, 1j), rtol=1e-4)
    zero_rows = np.all(np.asarray(got) == 0, axis=(1, 2))
    assert 0 < zero_rows.sum() < len(a)
