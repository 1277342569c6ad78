"""Stability metrics and BKStabilityMonitor: golden parity (reference mode), normalised mode, log-det identity."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phase1_jax.errors import InvalidConfigError
from phase1_jax.stability import (BKStabilityMonitor, StabilityThresholds, causal_resolvent_diagonal,
                                  stability_metrics)

DET_ACTIONS = ["CRITICAL: Apply gradient clipping (max_norm=1.0)", "CRITICAL: Reduce learning rate by 50%",
               "Consider increasing epsilon regularization"]


def _bk_resolvent(v, z=1j):
    """G_ii of tridiag(1, −2 + v, 1) − zI and the causal diagonals g_t, in complex128 (two continued fractions)."""
    b, n = v.shape
    d = (-2.0 + v) - z
    left = np.zeros((b, n), complex)
    right = np.zeros((b, n), complex)
    prev = np.zeros(b, complex)
    for t in range(n):
        prev = left[:, t] = 1.0 / (d[:, t] - prev)
    prev = np.zeros(b, complex)
    for t in range(n - 1, -1, -1):
        prev = right[:, t] = 1.0 / (d[:, t] - prev)
    left_prev = np.concatenate([np.zeros((b, 1)), left[:, :-1]], axis=1)
    right_next = np.concatenate([right[:, 1:], np.zeros((b, 1))], axis=1)
    return 1.0 / (d - left_prev - right_next), left


def _dense(v, z=1j):
    n = v.shape[-1]
    return np.diag(-2.0 + v) + np.eye(n, k=1) + np.eye(n, k=-1) - z * np.eye(n)


def _healthy(n, b=2, seed=0):
    v = np.random.default_rng(seed).uniform(-3, 3, (b, n))
    G, _ = _bk_resolvent(v)
    return G.astype(np.complex64), v.astype(np.float32)


def test_golden_stability_small_reference_mode(golden_dir):
    case = golden_dir / "stability_small"
    meta = json.loads((case / "case.json").read_text())["constructor"]
    G = np.load(case / "input_G_ii_real.npy") + 1j * np.load(case / "input_G_ii_imag.npy")
    v = np.load(case / "input_potential.npy")
    monitor = BKStabilityMonitor(mode="reference")
    result = monitor.check_stability(G.astype(np.complex64), v, meta["epsilon"], meta["gradient_norm"])
    for name in ("det_condition", "eigenvalue_ratio", "gradient_norm", "is_stable", "max_eigenvalue",
                 "min_eigenvalue", "schatten_s1", "schatten_s2"):
        want = float(np.load(case / f"expected_{name}.npy"))
        got = float(getattr(result, name))
        assert abs(got - want) <= 1e-5 * max(abs(want), 1e-30), name
    assert result.warnings == ["Determinant condition 1.00e-06 below threshold 1.00e-06 - operator approaching "
                               "singularity"]
    assert result.recommended_actions == DET_ACTIONS
    assert result.is_critical
    assert monitor.total_checks == 1 and monitor.stability_violations == 1 and monitor.last_stable_step is None
    d = result.to_dict()
    assert d["num_warnings"] == 1 and d["num_actions"] == 3 and d["is_stable"] is False


@pytest.mark.parametrize("n", [40, 128, 4096])
def test_normalized_mode_accepts_healthy_sequences(n):
    G, v = _healthy(n, seed=n)
    if n <= 128:
        dense = np.linalg.inv(_dense(v[0].astype(np.float64)))
        np.testing.assert_allclose(G[0], np.diag(dense), atol=1e-6)
    result = BKStabilityMonitor().check_stability(G, v, 1.0)
    assert result.mode == "normalized"
    assert result.is_stable, result.warnings
    assert result.fraction_zero_rows == 0
    assert 0.0 < result.schatten_s1_per_token < 4.0


def test_reference_mode_misfires_on_healthy_n128():
    G, v = _healthy(128, seed=1)
    result = BKStabilityMonitor(mode="reference").check_stability(G, v, 1.0)
    assert not result.is_stable and result.is_critical
    assert result.det_condition < 1e-15  # exp(-0.35 N)
    assert result.warnings[0].startswith("Determinant condition")
    assert any(w.startswith("Schatten S1 norm") for w in result.warnings)
    assert result.recommended_actions[:3] == DET_ACTIONS


def test_zero_collapse_is_critical_in_normalized_mode_and_missed_by_reference():
    _, v = _healthy(128, seed=2)
    G = np.zeros(v.shape, np.complex64)  # what BK-Core returns past its overflow cliff (N >= 446-1338)
    normalized = BKStabilityMonitor().check_stability(G, v, 1.0)
    assert not normalized.is_stable and normalized.is_critical
    assert normalized.fraction_zero_rows == 1.0
    assert "zero" in normalized.warnings[0]
    assert normalized.recommended_actions[0].startswith("CRITICAL")
    reference = BKStabilityMonitor(mode="reference").check_stability(G, v, 1.0)
    assert reference.is_stable and reference.det_condition == 1.0 and reference.schatten_s1 == 0.0

    G_partial, v_partial = _healthy(128, seed=3)
    G_partial[1] = 0
    partial = BKStabilityMonitor().check_stability(G_partial, v_partial, 1.0)
    assert partial.is_critical and partial.fraction_zero_rows == 0.5


def test_log_det_per_token_matches_dense_slogdet():
    rng = np.random.default_rng(4)
    v = rng.uniform(-3, 3, (3, 12))
    G, g_causal = _bk_resolvent(v)
    free = np.linalg.slogdet(_dense(np.zeros(12)))[1]
    want = np.mean([(np.linalg.slogdet(_dense(row))[1] - free) / 12 for row in v])
    metrics = jax.jit(stability_metrics)
    m_auto = metrics(G.astype(np.complex64), v.astype(np.float32), 1.0)
    m_given = metrics(G.astype(np.complex64), v.astype(np.float32), 1.0, g_causal=g_causal.astype(np.complex64))
    np.testing.assert_allclose(float(m_auto["log_det_per_token"]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m_given["log_det_per_token"]), want, rtol=1e-5, atol=1e-6)
    # −Σ log|g_t| identity, checked directly against one row's determinant.
    np.testing.assert_allclose(-np.log(np.abs(g_causal[0])).sum(), np.linalg.slogdet(_dense(v[0]))[1], rtol=1e-10)
    np.testing.assert_allclose(jax.jit(causal_resolvent_diagonal)(v.astype(np.float32)), g_causal,
                               rtol=2e-5, atol=1e-6)


def test_stability_metrics_is_jittable_and_matches_numpy():
    G, v = _healthy(40, seed=5)
    G[1, 3] = 0  # one zero entry: the clamps must act, but the row is not a collapsed row
    eps = 0.5
    got = jax.jit(stability_metrics)(jnp.asarray(G), jnp.asarray(v), eps)
    for key, value in got.items():
        assert value.shape == (), key
    gabs = np.abs(G.astype(np.complex128))
    clamped = np.clip(gabs, 1e-10, 1e10)
    k = (np.abs(v.astype(np.float64)) + eps) * gabs
    lam = 1.0 / clamped
    want = {
        "det_condition": np.exp(np.mean(-np.log1p(eps * clamped).sum(-1))),
        "schatten_s1": k.sum(-1).mean(),
        "schatten_s2": np.sqrt((k ** 2).sum(-1).mean()),
        "min_eigenvalue": lam.min(),
        "max_eigenvalue": lam.max(),
        "eigenvalue_ratio": lam.max() / (lam.min() + 1e-10),
        "schatten_s1_per_token": k.mean(),
        "schatten_s2_per_token": np.sqrt((k ** 2).mean()),
        "g_abs_max": gabs.max(),
        "g_abs_min": 0.0,
        "fraction_zero_rows": 0.0,
        "all_finite": 1.0,
    }
    for key, value in want.items():
        np.testing.assert_allclose(float(got[key]), value, rtol=1e-5, err_msg=key)
    assert np.isfinite(float(got["log_det_per_token"]))


def _metrics(**overrides):
    base = dict(det_condition=1.0, schatten_s1=1.0, schatten_s2=1.0, min_eigenvalue=1.0, max_eigenvalue=2.0,
                eigenvalue_ratio=2.0, log_det_per_token=0.1, schatten_s1_per_token=1.0,
                schatten_s2_per_token=1.0, g_abs_max=0.9, g_abs_min=0.2, fraction_zero_rows=0.0, all_finite=1.0)
    return base | overrides


def test_actions_order_and_dedup_and_history():
    monitor = BKStabilityMonitor(mode="reference", history_size=3)
    everything = monitor.check_metrics(_metrics(det_condition=1e-9, schatten_s1=1e3, schatten_s2=1e3,
                                                min_eigenvalue=1e-9, eigenvalue_ratio=1e9), gradient_norm=50.0)
    assert [w.split()[0] for w in everything.warnings] == ["Determinant", "Schatten", "Schatten", "Minimum",
                                                           "Eigenvalue", "Gradient"]
    assert everything.recommended_actions == DET_ACTIONS + [
        "Apply spectral clipping to operator (clip S1 norm)", "Reduce potential magnitude or increase epsilon",
        "Apply spectral clipping to operator (clip S2 norm)", "Consider weight decay or L2 regularization",
        "Increase epsilon to avoid singular operator", "Check for numerical precision issues (use float64)",
        "Operator is ill-conditioned - apply preconditioning", "Consider reducing model complexity or rank",
        "Apply gradient clipping immediately", "Reduce learning rate", "Check for NaN/Inf in inputs"]
    for s1 in (2.0, 3.0, 4.0, 5.0):
        assert monitor.check_metrics(_metrics(schatten_s1=s1)).is_stable
    assert monitor.total_checks == 5 and monitor.stability_violations == 1 and monitor.last_stable_step == 5
    stats = monitor.get_history_stats()
    assert set(stats) == {"det_condition", "schatten_s1", "schatten_s2", "min_eigenvalue", "gradient_norm"}
    assert stats["schatten_s1"] == {"mean": 4.0, "std": 1.0, "min": 3.0, "max": 5.0}
    summary = monitor.get_summary()
    assert summary["stability_rate"] == 0.8 and summary["history_stats"] == stats

    normalized = BKStabilityMonitor()
    both = normalized.check_metrics(_metrics(fraction_zero_rows=0.5, min_eigenvalue=1e-9))
    precision = "Check for numerical precision issues (use float64)"
    assert both.recommended_actions.count(precision) == 1
    assert both.recommended_actions[0].startswith("CRITICAL")
    nan = normalized.check_metrics(_metrics(log_det_per_token=float("nan")))
    assert not nan.is_stable and nan.is_critical


def test_threshold_and_mode_validation():
    with pytest.raises(InvalidConfigError):
        StabilityThresholds(det_threshold=0.0)
    with pytest.raises(InvalidConfigError):
        StabilityThresholds(condition_number_threshold=1.0)
    with pytest.raises(InvalidConfigError, match="mode"):
        BKStabilityMonitor(mode="strict")
    t = StabilityThresholds()
    with pytest.raises(AttributeError):
        t.det_threshold = 1.0  # frozen
    assert (t.det_threshold, t.schatten_s1_bound, t.schatten_s2_bound, t.min_eigenvalue_threshold,
            t.gradient_norm_threshold, t.condition_number_threshold) == (1e-6, 100.0, 50.0, 1e-8, 10.0, 1e6)


@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
def test_in_step_stability_metrics_equal_the_diagnostics_on_the_same_batch(direction):
    from phase1_jax.config import TrainConfig
    from phase1_jax.data import Batch
    from phase1_jax.phase1 import collect_phase1_diagnostics, create_phase1_model
    from phase1_jax.phase1_config import Phase1Config
    from phase1_jax.train import create_train_state, make_train_step

    model = create_phase1_model(vocab_size=50, d_model=16, n_layers=2, n_seq=24, num_experts=2, dropout=0.0,
                                bk_direction=direction, phase1=Phase1Config(ar_ssm_max_rank=4, htt_rank=4))
    ids = jax.random.randint(jax.random.key(1), (3, 25), 0, 50)
    batch = Batch(inputs=ids[:, :-1], targets=ids[:, 1:])
    diagnostics = collect_phase1_diagnostics(model, batch.inputs)["stability"]
    cfg = TrainConfig(batch_size=3, steps=2, warmup_steps=0)
    graphdef, state, optimizer = create_train_state(model, cfg)
    _, metrics = make_train_step(graphdef, optimizer, model.config, cfg)(state, batch)
    in_step = {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("stability/")}
    assert set(in_step) == {"log_det_per_token", "g_abs_max", "g_abs_min", "fraction_zero_rows",
                            "schatten_s1_per_token", "schatten_s2_per_token"}
    for key, value in in_step.items():
        assert value == pytest.approx(diagnostics[f"stability/{key}"], rel=1e-5, abs=1e-7), key


def test_free_log_det_is_a_host_constant_equal_to_the_dense_determinant():
    from phase1_jax.stability import free_log_det

    n = 30
    dense = np.diag(np.full(n, -2.0 - 1j)) + np.diag(np.ones(n - 1), 1) + np.diag(np.ones(n - 1), -1)
    assert free_log_det(n) == pytest.approx(np.linalg.slogdet(dense)[1], rel=1e-12)
