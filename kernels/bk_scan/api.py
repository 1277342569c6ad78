"""One entry point for BK-Core features, dispatching on numerics, direction and implementation."""

from __future__ import annotations

from . import reference, xla

NUMERICS = ("reference", "native")
DIRECTIONS = ("causal", "bidirectional")
IMPLEMENTATIONS = ("xla", "reference")
# Named here so that asking for them gives a clear "not yet" instead of "unknown".
PLANNED_IMPLEMENTATIONS = ("pallas",)
DEFAULT_IMPLEMENTATION = "xla"

_TABLE = {
    ("reference", None, "xla"): xla.reference_mode_features,
    ("reference", None, "reference"): reference.reference_mode_features_host,
    ("native", "causal", "xla"): xla.causal_features,
    ("native", "bidirectional", "xla"): xla.bidirectional_features,
    ("native", "causal", "reference"): reference.causal_scan_reference,
    ("native", "bidirectional", "reference"): reference.bidirectional_scan_reference,
}


def _check_choice(argument, value, allowed):
    if value not in allowed:
        raise ValueError(f"{argument}={value!r} is not valid; allowed values: {', '.join(map(repr, allowed))}")


def bk_features(a, b, c, z, *, numerics: str, direction: str = "causal", implementation: str | None = None):
    """BK-Core features (B, N, 2) float32 = [Re G, Im G] for the tridiagonal H (diagonal a, super b, sub c).

    a: (B, N) float32 (h0 diagonal + potential); b, c: (N-1,) or (B, N-1), None for all ones; z: complex scalar.

    numerics:
      "reference"  the PyTorch reference (REFERENCE_SPEC 1.7/1.8): full-matrix diagonal with its complex128
                   overflow cliff (rows become 0 for long sequences) and its heuristic backward. It has only its
                   own (bidirectional, non-causal) semantics, so `direction` is validated but ignored.
      "native"     finite at any length, exact gradients for `a`.
    direction (native only): "causal" gives g_t = [(H_{0..t} - z)^-1]_{tt}, which depends on a_0..a_t only;
      "bidirectional" gives [(H - zI)^-1]_ii, which depends on the whole sequence.
    implementation: None (the default, "xla"), "xla" (parallel scans) or "reference" (sequential lax.scan for native;
      for reference numerics, the exact complex128 forward run on the host through a callback: slow).
    b, c and z never receive gradients.
    """
    _check_choice("numerics", numerics, NUMERICS)
    _check_choice("direction", direction, DIRECTIONS)
    if implementation in PLANNED_IMPLEMENTATIONS:
        raise NotImplementedError(
            f"implementation={implementation!r} is not available yet; available: {', '.join(map(repr, IMPLEMENTATIONS))}"
            " (or None for the default)")
    if implementation is None:
        implementation = DEFAULT_IMPLEMENTATION
    _check_choice("implementation", implementation, IMPLEMENTATIONS + (None,))
    key = (numerics, None if numerics == "reference" else direction, implementation)
    return _TABLE[key](a, b, c, z)
