"""Birman–Schwinger stability monitor for the BK-Core resolvent (REFERENCE_SPEC §2.5, §4 item 12).

Two layers:

* `stability_metrics(G, v, epsilon, g_causal=None)`: pure and jit-able; returns a dict of scalar arrays. It computes
  the reference's heuristics (det_condition, Schatten S1/S2, eigenvalue proxies) with the reference's clamps, and
  length-normalised quantities that mean the same thing at every sequence length.
* `BKStabilityMonitor`: host-side bookkeeping (thresholds, warnings, recommended actions, history). Call
  `check_stability` with arrays, or compute `stability_metrics` inside a jitted step and hand the fetched dict to
  `check_metrics`, so the step itself never syncs with the host.

Why a normalised mode. The reference's det_condition = exp(−Σ_i log(1 + ε|G_ii|)) is a product over tokens, so it
decays like e^{−cN} (c ≈ 0.35 for v ~ U[−3, 3], ε = 1): every healthy sequence longer than ~40 tokens is flagged
"CRITICAL", and S1 (a sum over tokens) crosses its bound near N ≈ 100. Meanwhile the one real failure, the
overflow collapse where BK-Core returns G ≡ 0 on a row, passes as stable (det = 1, S1 = 0). mode="normalized"
judges per-token quantities instead and checks for the collapse explicitly; mode="reference" reproduces the
reference, misfires included.

The log-determinant identity used for `log_det_per_token`. For a tridiagonal T = H − zI with diagonal d_t and
off-diagonal products c_t b_t, let θ_t be the leading t×t principal minor (θ_0 = 1). The last diagonal entry of the
inverse of the leading (t+1)×(t+1) block is g_t = θ_t / θ_{t+1}, and it obeys the continued fraction
g_t = 1 / (d_t − c_{t−1} b_{t−1} g_{t−1}). Multiplying, Π_t g_t = θ_0 / θ_N = 1 / det T, hence

    log|det(H − zI)| = −Σ_t log|g_t|.

The ratio recurrence never overflows (for real H and Im z > 0, |g_t| ≤ 1/Im z and Im(d_t − g_{t−1}) ≤ −Im z), unlike
the reference's unnormalised θ recurrence. log_det_per_token compares with the free operator H₀ (v = 0):
(log|det(H − zI)| − log|det(H₀ − zI)|) / N, averaged over the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import InvalidConfigError
from .kernels.bk_scan import bk_features

logger = logging.getLogger(__name__)

MODES = ("reference", "normalized")

# BK-Core's operator: H = tridiag(1, −2 + v, 1), probed at z = i (REFERENCE_SPEC §1.6).
BK_Z = 1j
BK_H0_DIAG = -2.0
BK_OFF_DIAG = 1.0


# ------------------------------------------------------------------------------------------------ device side


def causal_resolvent_diagonal(v: jax.Array, *, z: complex = BK_Z, h0_diag: float = BK_H0_DIAG,
                              off_diag: float = BK_OFF_DIAG) -> jax.Array:
    """g_t = [(H_{0:t+1} − zI)^{-1}]_{tt} for H = tridiag(off_diag, h0_diag + v, off_diag), along the last axis.

    The continued fraction g_t = 1 / (d_t − off_diag²·g_{t−1}) of BK-Core's native causal mode, computed by the same
    op (`kernels.bk_scan.bk_features`, so the GPU kernels on a GPU and a parallel scan elsewhere: nothing sequential
    runs per training step). v is real with time on the last axis; the result is complex64.
    """
    v = jnp.asarray(v, jnp.float32)
    rows = v.reshape(-1, v.shape[-1])
    couplings = None
    if off_diag != 1.0:
        couplings = jnp.full((rows.shape[-1] - 1,), off_diag, jnp.float32)
    feats = bk_features(h0_diag + rows, couplings, couplings, z, numerics="native", direction="causal")
    return jax.lax.complex(feats[..., 0], feats[..., 1]).reshape(v.shape)


@functools.lru_cache(maxsize=64)
def free_log_det(length: int, *, z: complex = BK_Z, h0_diag: float = BK_H0_DIAG,
                 off_diag: float = BK_OFF_DIAG) -> float:
    """log|det(H₀ − zI)| of the free operator (v = 0) of size `length`: −Σ_t log|g_t|, in float64 on the host.

    A constant of the sequence length: computed once per length (outside any jitted step) and folded in.
    """
    d = complex(h0_diag) - complex(z)
    off2 = float(off_diag) ** 2
    g, total = 0j, 0.0
    for _ in range(int(length)):
        g = 1.0 / (d - off2 * g)
        total -= math.log(abs(g))
    return total


def stability_metrics(G: jax.Array, v: jax.Array, epsilon: float | jax.Array, g_causal: jax.Array | None = None,
                      *, z: complex = BK_Z, h0_diag: float = BK_H0_DIAG,
                      off_diag: float = BK_OFF_DIAG) -> dict[str, jax.Array]:
    """Stability metrics of a BK resolvent diagonal; pure, jit-able, no host sync.

    Args:
      G: (B, N) complex resolvent diagonal G_ii (or (N,)).
      v: (B, N) real potential (H = tridiag(off_diag, h0_diag + v, off_diag), as in BK-Core).
      epsilon: the Birman–Schwinger regulariser ε.
      g_causal: optional (B, N) causal diagonals g_t of H − zI (see the module docstring). If None they are
        computed from v with `causal_resolvent_diagonal`.

    Returns scalar arrays. Reference formulas (§2.5; |G| clamped to [1e-10, 1e10] where the reference clamps):
      det_condition   exp(mean_b −Σ_i log(1 + ε·clamp|G_bi|))          (a heuristic, not a determinant)
      schatten_s1     mean_b Σ_i K_bi,  K = √(|v|+ε)·|G|·√(|v|+ε)       (unclamped |G|)
      schatten_s2     √(mean_b Σ_i K_bi²)
      min_eigenvalue, max_eigenvalue   min / max of 1/clamp|G|
      eigenvalue_ratio                 max / (min + 1e-10)
    Length-normalised:
      log_det_per_token      mean_b (log|det(H − zI)| − log|det(H₀ − zI)|) / N
      schatten_s1_per_token  schatten_s1 / N  (mean of K)
      schatten_s2_per_token  schatten_s2 / √N (root mean square of K)
      g_abs_max, g_abs_min   extremes of |G|
      fraction_zero_rows     fraction of batch rows where G is identically 0 (BK-Core's overflow collapse)
      all_finite             1.0 if G, v (and g_causal) are all finite, else 0.0
    """
    G = jnp.asarray(G)
    v = jnp.asarray(v)
    if G.ndim == 1:
        G, v = G[None], v[None]
        g_causal = None if g_causal is None else jnp.asarray(g_causal)[None]
    if G.shape != v.shape:
        raise ValueError(f"G and v must have the same shape, got {G.shape} and {v.shape}")
    length = G.shape[-1]
    g_abs = jnp.abs(G)
    real_dtype = g_abs.dtype
    v = v.astype(real_dtype)
    eps = jnp.asarray(epsilon, real_dtype)
    clamped = jnp.clip(g_abs, 1e-10, 1e10)

    det_condition = jnp.exp(jnp.mean(-jnp.sum(jnp.log(1.0 + eps * clamped), axis=-1)))
    root = jnp.sqrt(jnp.abs(v) + eps)
    k_mag = root * g_abs * root
    schatten_s1 = jnp.mean(jnp.sum(k_mag, axis=-1))
    schatten_s2 = jnp.sqrt(jnp.mean(jnp.sum(k_mag ** 2, axis=-1)))
    lam = 1.0 / clamped
    min_eig = jnp.min(lam)
    max_eig = jnp.max(lam)

    if g_causal is None:
        g_causal = causal_resolvent_diagonal(v, z=z, h0_diag=h0_diag, off_diag=off_diag)
    g_causal = jnp.asarray(g_causal)
    log_det = -jnp.sum(jnp.log(jnp.abs(g_causal)), axis=-1)
    # H₀ depends only on N: a host constant, so the step computes nothing sequential for it.
    log_det_free = free_log_det(length, z=z, h0_diag=h0_diag, off_diag=off_diag)
    log_det_per_token = jnp.mean(log_det - log_det_free) / length

    all_finite = (jnp.all(jnp.isfinite(G)) & jnp.all(jnp.isfinite(v)) & jnp.all(jnp.isfinite(g_causal)))
    zero_rows = jnp.all(G == 0, axis=-1)
    return {
        "det_condition": det_condition,
        "schatten_s1": schatten_s1,
        "schatten_s2": schatten_s2,
        "min_eigenvalue": min_eig,
        "max_eigenvalue": max_eig,
        "eigenvalue_ratio": max_eig / (min_eig + 1e-10),
        "log_det_per_token": log_det_per_token.astype(real_dtype),
        "schatten_s1_per_token": schatten_s1 / length,
        "schatten_s2_per_token": schatten_s2 / math.sqrt(length),
        "g_abs_max": jnp.max(g_abs),
        "g_abs_min": jnp.min(g_abs),
        "fraction_zero_rows": jnp.mean(zero_rows.astype(real_dtype)),
        "all_finite": all_finite.astype(real_dtype),
    }


_stability_metrics_jit = jax.jit(stability_metrics, static_argnames=("z", "h0_diag", "off_diag"))


# -------------------------------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class StabilityThresholds:
    """Thresholds of the monitor. The first six are the reference's (same defaults, same meaning).

    mode="normalized" uses min_eigenvalue_threshold, condition_number_threshold and gradient_norm_threshold
    as they are (they do not depend on N), and replaces det / S1 / S2 with the per-token fields below:

      det_per_token_threshold      exp(log_det_per_token) below it is flagged. For a real potential and z = i
                                   every factor |λ − i| ≥ 1, so log|det(H − i)| ≥ 0 and the ratio to H₀ is at
                                   least e^{−0.733} ≈ 0.48 per token (0.733 = mean of ½·log(1 + λ²) over H₀'s
                                   spectrum [−4, 0]). Healthy random potentials give 0.8–2.4. A value under
                                   0.1 means the inputs are not a real-potential resolvent (or z moved towards
                                   the real axis, where singularity becomes possible).
      schatten_s1_per_token_bound  mean of K = (|v|+ε)|G|. Since |G| ≤ 1/Im z = 1, K ≤ |v| + ε; BK clamps v to
                                   ±3, so a healthy model stays below ~4 (random potentials: ~0.5–1.5).
      schatten_s2_per_token_bound  root mean square of K, same reasoning.
    """

    det_threshold: float = 1e-6
    schatten_s1_bound: float = 100.0
    schatten_s2_bound: float = 50.0
    min_eigenvalue_threshold: float = 1e-8
    gradient_norm_threshold: float = 10.0
    condition_number_threshold: float = 1e6
    det_per_token_threshold: float = 0.1
    schatten_s1_per_token_bound: float = 10.0
    schatten_s2_per_token_bound: float = 10.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise InvalidConfigError(f.name, value, "must be a positive number")
        if not self.condition_number_threshold > 1:
            raise InvalidConfigError("condition_number_threshold", self.condition_number_threshold, "must be > 1")


@dataclass
class StabilityMetrics:
    """One check's result. The first ten fields are the reference's; the rest are ours."""

    det_condition: float
    schatten_s1: float
    schatten_s2: float
    min_eigenvalue: float
    max_eigenvalue: float
    eigenvalue_ratio: float
    gradient_norm: float
    is_stable: bool
    warnings: list[str] = field(default_factory=list)
    recommended_actions: list[str] = field(default_factory=list)
    is_critical: bool = False
    mode: str = "reference"
    log_det_per_token: float = float("nan")
    schatten_s1_per_token: float = float("nan")
    schatten_s2_per_token: float = float("nan")
    g_abs_max: float = float("nan")
    g_abs_min: float = float("nan")
    fraction_zero_rows: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        """The reference's logging dict (counts of warnings and actions), followed by our extra fields."""
        return {
            "det_condition": self.det_condition,
            "schatten_s1": self.schatten_s1,
            "schatten_s2": self.schatten_s2,
            "min_eigenvalue": self.min_eigenvalue,
            "max_eigenvalue": self.max_eigenvalue,
            "eigenvalue_ratio": self.eigenvalue_ratio,
            "gradient_norm": self.gradient_norm,
            "is_stable": self.is_stable,
            "num_warnings": len(self.warnings),
            "num_actions": len(self.recommended_actions),
            "is_critical": self.is_critical,
            "mode": self.mode,
            "log_det_per_token": self.log_det_per_token,
            "schatten_s1_per_token": self.schatten_s1_per_token,
            "schatten_s2_per_token": self.schatten_s2_per_token,
            "g_abs_max": self.g_abs_max,
            "g_abs_min": self.g_abs_min,
            "fraction_zero_rows": self.fraction_zero_rows,
        }


# Rule -> actions, in the order they are reported (reference §2.5 table; "collapse" is ours).
_ACTIONS = {
    "collapse": ("CRITICAL: Resolvent diagonal collapsed or non-finite - use the rescaled (ratio) BK recurrence "
                 "or complex128, or shorten the sequence",
                 "Check for numerical precision issues (use float64)"),
    "det": ("CRITICAL: Apply gradient clipping (max_norm=1.0)", "CRITICAL: Reduce learning rate by 50%",
            "Consider increasing epsilon regularization"),
    "s1": ("Apply spectral clipping to operator (clip S1 norm)", "Reduce potential magnitude or increase epsilon"),
    "s2": ("Apply spectral clipping to operator (clip S2 norm)", "Consider weight decay or L2 regularization"),
    "min_eig": ("Increase epsilon to avoid singular operator", "Check for numerical precision issues (use float64)"),
    "cond": ("Operator is ill-conditioned - apply preconditioning", "Consider reducing model complexity or rank"),
    "grad": ("Apply gradient clipping immediately", "Reduce learning rate", "Check for NaN/Inf in inputs"),
}
_CRITICAL_RULES = ("collapse", "det")

_REFERENCE_HISTORY_KEYS = ("det_condition", "schatten_s1", "schatten_s2", "min_eigenvalue", "gradient_norm")
_NORMALIZED_HISTORY_KEYS = ("log_det_per_token", "schatten_s1_per_token", "schatten_s2_per_token", "g_abs_min",
                            "fraction_zero_rows")


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    # Unbiased std like torch.Tensor.std(); a single value gives NaN there too.
    std = float(np.std(a, ddof=1)) if a.size > 1 else float("nan")
    return {"mean": float(a.mean()), "std": std, "min": float(a.min()), "max": float(a.max())}


class BKStabilityMonitor:
    """Host-side stability bookkeeping for BK-Core (REFERENCE_SPEC §2.5).

    mode="normalized" (the default, for new models) applies the thresholds to length-normalised metrics and flags
    the overflow collapse (G ≡ 0 on a row, or non-finite values) as critical; a healthy sequence is not flagged at
    any length. mode="reference" reproduces the reference exactly, including its misfires: healthy sequences of
    N ≳ 40 are flagged "CRITICAL" and the all-zero collapse is reported stable.

    The gradient norm is the argument or 0.0 (JAX has no `.grad` to fall back on).
    """

    def __init__(self, thresholds: StabilityThresholds | None = None, enable_history: bool = True,
                 history_size: int = 1000, mode: str = "normalized"):
        if mode not in MODES:
            raise InvalidConfigError("mode", mode, f"must be one of {MODES}")
        if not isinstance(history_size, int) or history_size <= 0:
            raise InvalidConfigError("history_size", history_size, "must be a positive integer")
        self.thresholds = thresholds if thresholds is not None else StabilityThresholds()
        self.thresholds.validate()
        self.enable_history = enable_history
        self.history_size = history_size
        self.mode = mode
        self._history_keys = _REFERENCE_HISTORY_KEYS + (_NORMALIZED_HISTORY_KEYS if mode == "normalized" else ())
        self.history: dict[str, list[float]] = {k: [] for k in self._history_keys}
        self.total_checks = 0
        self.stability_violations = 0
        self.last_stable_step: int | None = None

    # ---------------------------------------------------------------------------------------------- checking

    def check_stability(self, G_ii: Any, potential: Any, epsilon: float, gradient_norm: float | None = None, *,
                        g_causal: Any = None) -> StabilityMetrics:
        """Computes `stability_metrics` (jitted, one host transfer) and judges it with `check_metrics`."""
        metrics = _stability_metrics_jit(jnp.asarray(G_ii), jnp.asarray(potential), epsilon,
                                         None if g_causal is None else jnp.asarray(g_causal))
        return self.check_metrics(jax.device_get(metrics), gradient_norm)

    def check_metrics(self, metrics: dict[str, Any], gradient_norm: float | None = None) -> StabilityMetrics:
        """Judges a (fetched) `stability_metrics` dict; updates counters and history."""
        m = {k: float(np.asarray(val)) for k, val in metrics.items()}
        grad = 0.0 if gradient_norm is None else float(gradient_norm)
        self.total_checks += 1
        fired = self._rules(m, grad)
        warnings_ = [msg for _, msg in fired]
        actions: list[str] = []
        if fired:
            self.stability_violations += 1
            rules = {rule for rule, _ in fired}
            for rule, rule_actions in _ACTIONS.items():
                if rule in rules:
                    actions += [a for a in rule_actions if a not in actions]
        else:
            self.last_stable_step = self.total_checks
        result = StabilityMetrics(
            det_condition=m["det_condition"], schatten_s1=m["schatten_s1"], schatten_s2=m["schatten_s2"],
            min_eigenvalue=m["min_eigenvalue"], max_eigenvalue=m["max_eigenvalue"],
            eigenvalue_ratio=m["eigenvalue_ratio"], gradient_norm=grad, is_stable=not fired,
            warnings=warnings_, recommended_actions=actions,
            is_critical=any(rule in _CRITICAL_RULES for rule, _ in fired), mode=self.mode,
            log_det_per_token=m.get("log_det_per_token", float("nan")),
            schatten_s1_per_token=m.get("schatten_s1_per_token", float("nan")),
            schatten_s2_per_token=m.get("schatten_s2_per_token", float("nan")),
            g_abs_max=m.get("g_abs_max", float("nan")), g_abs_min=m.get("g_abs_min", float("nan")),
            fraction_zero_rows=m.get("fraction_zero_rows", float("nan")),
        )
        self._update_history(result)
        return result

    def _rules(self, m: dict[str, float], grad: float) -> list[tuple[str, str]]:
        t = self.thresholds
        fired: list[tuple[str, str]] = []
        if self.mode == "reference":
            # Plain comparisons, as in the reference (a NaN metric passes every rule there, too).
            if m["det_condition"] < t.det_threshold:
                fired.append(("det", f"Determinant condition {m['det_condition']:.2e} below threshold "
                                     f"{t.det_threshold:.2e} - operator approaching singularity"))
            if m["schatten_s1"] > t.schatten_s1_bound:
                fired.append(("s1", f"Schatten S1 norm {m['schatten_s1']:.2f} exceeds bound "
                                    f"{t.schatten_s1_bound:.2f} - operator too large"))
            if m["schatten_s2"] > t.schatten_s2_bound:
                fired.append(("s2", f"Schatten S2 norm {m['schatten_s2']:.2f} exceeds bound "
                                    f"{t.schatten_s2_bound:.2f} - operator energy too high"))
        else:
            zero = m["fraction_zero_rows"]
            if zero > 0:
                fired.append(("collapse", f"Resolvent diagonal is identically zero on {zero:.1%} of rows - "
                                          "BK-Core overflow collapse (features silently zeroed)"))
            if m.get("all_finite", 1.0) < 1:
                fired.append(("collapse", "Non-finite values in the resolvent diagonal or potential"))
            det_pt = math.exp(m["log_det_per_token"]) if math.isfinite(m["log_det_per_token"]) else float("nan")
            if not det_pt >= t.det_per_token_threshold:  # NaN fails too
                fired.append(("det", f"Determinant per token {det_pt:.2e} below threshold "
                                     f"{t.det_per_token_threshold:.2e} - operator approaching singularity"))
            if not m["schatten_s1_per_token"] <= t.schatten_s1_per_token_bound:
                fired.append(("s1", f"Schatten S1 norm per token {m['schatten_s1_per_token']:.2f} exceeds bound "
                                    f"{t.schatten_s1_per_token_bound:.2f} - operator too large"))
            if not m["schatten_s2_per_token"] <= t.schatten_s2_per_token_bound:
                fired.append(("s2", f"Schatten S2 norm per token {m['schatten_s2_per_token']:.2f} exceeds bound "
                                    f"{t.schatten_s2_per_token_bound:.2f} - operator energy too high"))
        if m["min_eigenvalue"] < t.min_eigenvalue_threshold:
            fired.append(("min_eig", f"Minimum eigenvalue {m['min_eigenvalue']:.2e} below threshold "
                                     f"{t.min_eigenvalue_threshold:.2e} - near-zero eigenvalue detected"))
        if m["eigenvalue_ratio"] > t.condition_number_threshold:
            fired.append(("cond", f"Eigenvalue ratio {m['eigenvalue_ratio']:.2e} exceeds threshold "
                                  f"{t.condition_number_threshold:.2e} - ill-conditioned operator"))
        if grad > t.gradient_norm_threshold:
            fired.append(("grad", f"Gradient norm {grad:.2f} exceeds threshold "
                                  f"{t.gradient_norm_threshold:.2f} - potential gradient explosion"))
        return fired

    # ----------------------------------------------------------------------------------------------- history

    def _update_history(self, metrics: StabilityMetrics) -> None:
        if not self.enable_history:
            return
        for key in self._history_keys:
            values = self.history[key]
            values.append(float(getattr(metrics, key)))
            if len(values) > self.history_size:
                del values[:-self.history_size]

    def get_history_stats(self) -> dict[str, dict[str, float]]:
        """mean, unbiased std, min and max of every tracked metric; {} without history."""
        if not self.enable_history or not self.history[self._history_keys[0]]:
            return {}
        return {key: _stats(self.history[key]) for key in self._history_keys}

    def reset_history(self) -> None:
        """Clears the history and the counters."""
        for values in self.history.values():
            values.clear()
        self.total_checks = 0
        self.stability_violations = 0
        self.last_stable_step = None

    def get_summary(self) -> dict[str, Any]:
        """total_checks, stability_violations, stability_rate, last_stable_step (+ history_stats)."""
        rate = ((self.total_checks - self.stability_violations) / self.total_checks) if self.total_checks else 1.0
        summary: dict[str, Any] = {
            "total_checks": self.total_checks,
            "stability_violations": self.stability_violations,
            "stability_rate": rate,
            "last_stable_step": self.last_stable_step,
        }
        if self.enable_history and self.history[self._history_keys[0]]:
            summary["history_stats"] = self.get_history_stats()
        return summary

    # ----------------------------------------------------------------------------------------------- helpers

    @staticmethod
    def suggest_learning_rate_reduction(current_lr: float, reduction_factor: float = 0.5) -> float:
        """current_lr · reduction_factor (logged)."""
        new_lr = current_lr * reduction_factor
        logger.warning("Stability violation: suggest reducing LR %.2e -> %.2e", current_lr, new_lr)
        return new_lr

    def log_stability_event(self, metrics: StabilityMetrics, step: int, severity: str = "WARNING") -> None:
        """Logs one check with its warnings and actions at the given severity."""
        log = getattr(logger, severity.lower(), logger.warning)
        status = "STABLE" if metrics.is_stable else ("CRITICAL" if metrics.is_critical else "UNSTABLE")
        log("Stability event at step %d (%s mode): %s", step, metrics.mode, status)
        for key, value in metrics.to_dict().items():
            log("  %s: %s", key, value)
        for i, warning in enumerate(metrics.warnings, 1):
            log("  warning %d: %s", i, warning)
        for i, action in enumerate(metrics.recommended_actions, 1):
            log("  action %d: %s", i, action)
