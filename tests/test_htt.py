"""HolographicTTEmbedding: golden parity with the PyTorch reference, sizes, dense views, SVD initialisation."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phase1_jax.errors import InvalidConfigError, NumericalInstabilityError
from phase1_jax.models.common import Buffer
from phase1_jax.models.htt import HolographicTTEmbedding, tt_factorization

@functools.lru_cache(maxsize=None)
def _built(V, D, r, phase_encoding, seed):
    return HolographicTTEmbedding(V, D, rank=r, phase_encoding=phase_encoding, rngs=nnx.Rngs(seed))


def make(V, D, r=16, phase_encoding=True, seed=0):
    """A module with fresh variables (tests may mutate it); the random init is built once per configuration,
    because every distinct shape costs an XLA compilation."""
    return nnx.clone(_built(V, D, r, phase_encoding, seed))


def abstract(V, D, r=16, phase_encoding=True):
    """Shapes only (no arrays, no compilation): enough for the size bookkeeping."""
    return nnx.eval_shape(lambda: HolographicTTEmbedding(V, D, rank=r, phase_encoding=phase_encoding,
                                                         rngs=nnx.Rngs(0)))


def numpy_forward(core1, core2, phase, ids, D):
    """§2.1 steps 1-4 in numpy, token by token."""
    v2 = core2.shape[0]
    out = []
    for t in np.asarray(ids).reshape(-1):
        c1 = core1[t // v2, 0] * np.cos(phase)[:, None]  # (r, d1)
        c2 = core2[t % v2, :, 0]  # (r, d2)
        out.append(np.einsum("rj,rk->jk", c1.astype(np.float64), c2.astype(np.float64)).reshape(-1)[:D])
    return np.stack(out).reshape(*np.shape(ids), D)


# ---------------------------------------------------------------------- golden
def test_golden_htt_small(golden_dir):
    torch = pytest.importorskip("torch")
    case_dir = golden_dir / "htt_small"
    case = json.loads((case_dir / "case.json").read_text())
    kw = case["constructor"]
    state = torch.load(case_dir / "state_dict.pt", weights_only=True)
    emb = HolographicTTEmbedding(kw["vocab_size"], kw["d_model"], rank=kw["rank"], rngs=nnx.Rngs(0))
    assert set(state) == {"core1", "core2", "phase_shift"}
    for name in ("core1", "core2", "phase_shift"):
        var = getattr(emb, name)
        assert tuple(state[name].shape) == var.shape, name
        var[...] = jnp.asarray(state[name].numpy())
    ids = np.load(case_dir / "input_ids.npy")
    expected = np.load(case_dir / "expected_embeddings.npy")
    out = np.asarray(emb(jnp.asarray(ids, jnp.int32)))
    assert out.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(out - expected).max() <= 1e-5 * scale
    jitted = np.asarray(nnx.jit(lambda m, i: m(i))(emb, jnp.asarray(ids, jnp.int32)))
    assert np.abs(jitted - expected).max() <= 1e-5 * scale


# ---------------------------------------------------------------------- construction and sizes
def test_shapes_and_init():
    emb = make(1000, 64, 16)
    assert (emb.v1, emb.v2, emb.d1, emb.d2) == (32, 32, 8, 8)
    assert emb.core1.shape == (32, 1, 16, 8) and emb.core2.shape == (32, 16, 1, 8)
    assert isinstance(emb.phase_shift, nnx.Param) and emb.phase_shift.shape == (16,)
    assert np.std(np.asarray(emb.core1[...])) == pytest.approx(0.02, rel=0.1)
    assert np.std(np.asarray(emb.phase_shift[...])) == pytest.approx(0.1, rel=0.5)
    no_phase = make(1000, 64, 16, phase_encoding=False)
    assert isinstance(no_phase.phase_shift, Buffer) and not isinstance(no_phase.phase_shift, nnx.Param)
    assert np.all(np.asarray(no_phase.phase_shift[...]) == 0)


@pytest.mark.parametrize("V, D, r, standard, tt", [
    (1000, 64, 16, 64000, 8208),
    (1000, 64, 8, 64000, 4104),
    (32, 64, 16, 2048, 1552),
    (50257, 1024, 16, 51463168, 229904),
])
def test_parameter_counts_table(V, D, r, standard, tt):
    v1, v2, d1, d2 = tt_factorization(V, D)
    assert v1 * v2 >= V and d1 * d2 >= D
    emb = abstract(V, D, r)
    assert emb.parameter_counts() == (standard, tt)
    assert emb.compression_ratio() == pytest.approx(tt / standard, rel=1e-12)


def test_ratio_values_and_real_param_count():
    assert abstract(1000, 64, 16).compression_ratio() == pytest.approx(0.12825, abs=1e-6)
    assert abstract(1000, 64, 8).compression_ratio() == pytest.approx(0.06413, abs=1e-5)
    assert abstract(32, 64, 16).compression_ratio() == pytest.approx(0.758, abs=1e-3)
    for phase in (True, False):
        emb = abstract(1000, 64, 16, phase_encoding=phase)
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(emb, nnx.Param)))
        assert emb.parameter_counts()[1] == n_params
        assert emb.parameter_counts()[1] == 8192 + (16 if phase else 0)


def test_big_factorisation():
    assert tt_factorization(50257, 1024) == (225, 224, 32, 32)


@pytest.mark.parametrize("kw", [dict(vocab_size=0), dict(d_model=-1), dict(rank=0), dict(num_cores=3),
                                dict(num_cores=1), dict(rank=2.0), dict(init_scale=float("nan"))])
def test_validation(kw):
    args = dict(vocab_size=100, d_model=16, rank=4) | kw
    with pytest.raises(InvalidConfigError) as info:
        HolographicTTEmbedding(**args, rngs=nnx.Rngs(0))
    assert info.value.param_name == next(iter(kw))


# ---------------------------------------------------------------------- forward
@pytest.mark.parametrize("V, D, r, phase", [(97, 13, 5, True), (97, 13, 5, False), (1, 1, 2, True)])
def test_forward_matches_definition_odd_sizes(V, D, r, phase):
    emb = make(V, D, r, phase_encoding=phase)
    ids = np.random.default_rng(0).integers(0, V, size=(3, 11))
    ids[0, :2] = (0, V - 1)
    expected = numpy_forward(np.asarray(emb.core1[...]), np.asarray(emb.core2[...]),
                             np.asarray(emb.phase_shift[...]), ids, D)
    out = np.asarray(emb(jnp.asarray(ids)))
    assert out.shape == (3, 11, D)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    if not phase:  # zero buffer: the phase must not enter (cos 0 = 1 anyway, so check the buffer stays unused)
        emb.phase_shift[...] = jnp.full((r,), 1.0)
        np.testing.assert_allclose(np.asarray(emb(jnp.asarray(ids))), out)


def test_out_of_range_ids_are_nan_not_clamped():
    emb = make(1000, 64, 8)
    out = np.asarray(emb(jnp.array([[0, -1, 999, 1000, 1023, 5000]])))
    bad = ~np.isfinite(out).all(axis=-1)
    assert bad.tolist() == [[False, True, False, True, True, True]]
    with pytest.raises(NumericalInstabilityError) as info:
        emb.check_finite(out, jnp.array([[0, -1, 999, 1000, 1023, 5000]]))
    assert info.value.diagnostics["has_nan"] and info.value.diagnostics["out_of_range_ids"] == 4
    emb.check_finite(emb(jnp.arange(10)[None]))  # finite: no error


def test_float_ids_rejected():
    with pytest.raises(TypeError):
        make(97, 13, 5)(jnp.zeros((2, 3), jnp.float32))


@pytest.mark.parametrize("V, D, r, phase", [(1000, 64, 16, True), (97, 13, 5, False)])
def test_to_dense_equals_forward_on_all_ids(V, D, r, phase):
    emb = make(V, D, r, phase_encoding=phase)
    dense = np.asarray(emb.to_dense())
    assert dense.shape == (V, D)
    rows = np.asarray(emb(jnp.arange(V)[None]))[0]
    np.testing.assert_allclose(dense, rows, rtol=1e-6, atol=1e-7 * np.abs(rows).max())


@pytest.mark.parametrize("V, D, r", [(1000, 64, 16), (97, 13, 5)])
def test_tied_head_equals_dense_head(V, D, r):
    emb = make(V, D, r)
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, D)), jnp.float32)
    dense = np.asarray(jnp.einsum("...d,vd->...v", h, emb.to_dense(), precision="highest"))
    tied = np.asarray(emb.logits_from_cores(h))
    assert tied.shape == (2, 5, V)
    np.testing.assert_allclose(tied, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())


def test_gradients_reach_cores_and_phase():
    emb = make(97, 13, 5)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, size=(2, 9)))
    target = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 13)), jnp.float32)

    grads = nnx.grad(lambda m: jnp.sum(m(ids) * target))(emb)
    for name in ("core1", "core2", "phase_shift"):
        g = np.asarray(getattr(grads, name)[...])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name
    # phase gradient against a float64 central difference of the numpy definition
    core1, core2 = np.asarray(emb.core1[...]), np.asarray(emb.core2[...])
    phase = np.asarray(emb.phase_shift[...], np.float64)
    eps = 1e-5
    values = []
    for sign in (1, -1):
        p = phase.copy()
        p[0] += sign * eps
        values.append(np.sum(numpy_forward(core1, core2, p, np.asarray(ids), 13) * np.asarray(target)))
    fd = (values[0] - values[1]) / (2 * eps)
    assert float(grads.phase_shift[...][0]) == pytest.approx(fd, rel=1e-3)

    no_phase = make(97, 13, 5, phase_encoding=False)
    grads = nnx.grad(lambda m: jnp.sum(m(ids) * target))(no_phase)
    assert "phase_shift" not in nnx.to_pure_dict(grads)


# ---------------------------------------------------------------------- from_dense
def low_tt_rank_table(V, D, r, seed):
    """A V x D table of TT rank r, expanded in numpy from random cores (independent of the module)."""
    v1, v2, d1, d2 = tt_factorization(V, D)
    rng = np.random.default_rng(seed)
    c1, c2 = rng.normal(size=(v1, r, d1)), rng.normal(size=(v2, r, d2))
    return np.einsum("arj,brk->abjk", c1, c2).reshape(v1 * v2, d1 * d2)[:V, :D]


def reshaped_singular_values(E, v1, v2, d1, d2):
    """Independent construction of M[(a, j1), (b, j2)] = E[a*v2 + b, j1*d2 + j2] with explicit loops."""
    V, D = E.shape
    M = np.zeros((v1 * d1, v2 * d2))
    for t in range(V):
        a, b = divmod(t, v2)
        for j in range(D):
            j1, j2 = divmod(j, d2)
            M[a * d1 + j1, b * d2 + j2] = E[t, j]
    return np.linalg.svd(M, compute_uv=False)


@pytest.mark.parametrize("V, D, r, phase", [(256, 16, 6, True), (110, 30, 8, False), (100, 25, 3, True)])
def test_from_dense_reaches_eckart_young_bound(V, D, r, phase):
    # V = v1*v2 and D = d1*d2 here (no padding), so the truncated SVD is the optimum over the format.
    E = np.random.default_rng(5).normal(size=(V, D)) * 0.02
    v1, v2, d1, d2 = tt_factorization(V, D)
    assert v1 * v2 == V and d1 * d2 == D
    s = reshaped_singular_values(E, v1, v2, d1, d2)
    bound = np.sqrt(np.sum(s[r:] ** 2)) / np.linalg.norm(E)
    emb, report = HolographicTTEmbedding.from_dense(E, r, phase_encoding=phase)
    dense = np.asarray(emb.to_dense(), np.float64)
    rel = np.linalg.norm(dense - E) / np.linalg.norm(E)
    assert 0.05 < bound < 1
    assert rel == pytest.approx(bound, abs=1e-5)
    assert report["relative_error"] == pytest.approx(rel, abs=1e-7)
    assert report["error_bound"] == pytest.approx(bound, rel=1e-9)
    np.testing.assert_allclose(report["singular_values"], s, rtol=1e-9, atol=1e-12)
    assert report["rank"] == r and report["padded"] is False
    # any other rank-r member of the format does worse: a random perturbation of the cores cannot beat it
    emb.core1[...] = emb.core1[...] * 1.01
    assert np.linalg.norm(np.asarray(emb.to_dense(), np.float64) - E) / np.linalg.norm(E) > rel


def test_from_dense_phase_is_folded_and_trainable():
    E = np.random.default_rng(6).normal(size=(256, 16))
    emb, _ = HolographicTTEmbedding.from_dense(E, 8)
    phase = np.asarray(emb.phase_shift[...])
    assert isinstance(emb.phase_shift, nnx.Param)
    assert np.all(np.abs(phase) > 0) and np.all(np.cos(phase) > 0.87)  # nonzero: sin(phase) != 0 gives a gradient
    emb_r, _ = HolographicTTEmbedding.from_dense(E, 8, rngs=nnx.Rngs(9))
    phase_r = np.asarray(emb_r.phase_shift[...])
    assert np.all(np.abs(phase_r) <= 0.5) and len(set(phase_r.tolist())) == 8
    np.testing.assert_allclose(np.asarray(emb_r.to_dense()), np.asarray(emb.to_dense()), rtol=1e-4, atol=1e-5)
    ids = jnp.arange(256)[None]
    grads = nnx.grad(lambda m: jnp.sum(m(ids) ** 2))(emb)
    assert np.abs(np.asarray(grads.phase_shift[...])).min() > 0


@pytest.mark.parametrize("V, D, r", [(110, 30, 5), (100, 25, 3), (30, 12, 4)])
def test_from_dense_exact_for_low_tt_rank(V, D, r):
    E = low_tt_rank_table(V, D, r, seed=7)
    emb, report = HolographicTTEmbedding.from_dense(E, r)
    dense = np.asarray(emb.to_dense(), np.float64)
    assert np.linalg.norm(dense - E) / np.linalg.norm(E) <= 1e-5
    assert report["relative_error"] <= 1e-5 and report["error_bound"] <= 1e-5
    # a larger rank than needed stays exact; its extra components are zero
    emb, report = HolographicTTEmbedding.from_dense(E, r + 3)
    assert report["relative_error"] <= 1e-5


def test_from_dense_rank_beyond_matrix_is_zero_padded():
    E = np.random.default_rng(8).normal(size=(30, 12))  # v1, v2, d1, d2 = 6, 5, 4, 3 -> M is 24 x 15
    emb, report = HolographicTTEmbedding.from_dense(E, 20)
    assert emb.core1.shape == (6, 1, 20, 4) and emb.core2.shape == (5, 20, 1, 3)
    assert report["kept"] == 15
    np.testing.assert_array_equal(np.asarray(emb.core1[...])[:, :, 15:], 0)
    np.testing.assert_array_equal(np.asarray(emb.core2[...])[:, 15:], 0)
    assert report["relative_error"] <= 1e-6  # full rank of M: exact


def test_from_dense_padded_table_and_refinement():
    # V=250 pads to 256 rows (D=30 = 6*5 does not pad); V=95, D=14 pad to 100 x 16. The error on the real
    # entries is at most the SVD bound, and hard-impute refinement only improves it.
    for V, D in ((250, 30), (95, 14)):
        E = np.random.default_rng(9).normal(size=(V, D))
        _, plain = HolographicTTEmbedding.from_dense(E, 4)
        _, refined = HolographicTTEmbedding.from_dense(E, 4, refine_iters=3)
        assert plain["padded"]
        assert plain["relative_error"] <= plain["error_bound"] + 1e-6
        assert refined["relative_error"] <= plain["relative_error"] + 1e-7
    # a padded table of low TT rank: plain SVD also fits the zero padding, refinement recovers the table
    E = low_tt_rank_table(250, 30, 4, seed=11)
    _, plain = HolographicTTEmbedding.from_dense(E, 4)
    _, refined = HolographicTTEmbedding.from_dense(E, 4, refine_iters=10)
    assert plain["relative_error"] > 1e-2
    assert refined["relative_error"] < 1e-2 * plain["relative_error"]


def test_from_dense_validation():
    with pytest.raises(InvalidConfigError):
        HolographicTTEmbedding.from_dense(np.zeros((4,)), 2)
    with pytest.raises(InvalidConfigError):
        HolographicTTEmbedding.from_dense(np.full((4, 4), np.nan), 2)
    with pytest.raises(InvalidConfigError):
        HolographicTTEmbedding.from_dense(np.ones((4, 4)), 0)
