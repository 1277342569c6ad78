"""One entry point for BK-Core features, dispatching on numerics, direction and implementation."""

from __future__ import annotations

from ..dispatch import Dispatcher
from . import pallas, pallas_torch_parity, reference, xla

NUMERICS = ("reference", "native")
DIRECTIONS = ("causal", "bidirectional")
# The default: "scan" on a CPU, where the sequential lax.scan is 20-30x faster than the parallel (recursive-doubling)
# form and compiles in a fraction of the time (the parallel form is for accelerators, where a sequential loop leaves
# the chip idle); "pallas" on a CUDA GPU >= sm_80 (both numerics: `pallas.py` for native numerics,
# `pallas_torch_parity.py` for the sweeps of reference numerics); "xla" on other accelerators, and on a GPU where the
# kernels cannot run (with a one-time warning).
DISPATCHER = Dispatcher("bk_scan", ("xla", "scan", "reference", "pallas"), cpu_default="scan")
# The values `implementation=` accepts, None (the default) first.
IMPLEMENTATIONS = DISPATCHER.choices
# Those that can run here (decided when called: at import time it would initialise the JAX backend).
available_implementations = DISPATCHER.available

_TABLE = {
    ("reference", None, "xla"): xla.reference_mode_features,
    ("reference", None, "reference"): reference.reference_mode_features_host,
    ("native", "causal", "xla"): xla.causal_features,
    ("native", "bidirectional", "xla"): xla.bidirectional_features,
    # Sequential lax.scan in complex64, differentiated by JAX (exact): the fast choice on a CPU. Reference numerics
    # have no sequential variant, so "scan" uses the log-magnitude (xla) forward there.
    ("reference", None, "scan"): xla.reference_mode_features,
    # The XLA forward with its three sweeps computed by a Pallas kernel; the same cliff logic and heuristic backward.
    ("reference", None, "pallas"): pallas_torch_parity.reference_mode_features_pallas,
    ("native", "causal", "scan"): reference.causal_scan_reference,
    ("native", "bidirectional", "scan"): reference.bidirectional_scan_reference,
    ("native", "causal", "reference"): reference.causal_scan_reference,
    ("native", "bidirectional", "reference"): reference.bidirectional_scan_reference,
    ("native", "causal", "pallas"): pallas.causal_features_pallas,
    ("native", "bidirectional", "pallas"): pallas.bidirectional_features_pallas,
}


def _check_choice(argument, value, allowed):
    if value not in allowed:
        raise ValueError(f"{argument}={value!r} is not valid; allowed values: {', '.join(map(repr, allowed))}")


def resolve(numerics: str, direction: str = "causal", implementation: str | None = None):
    """The function `bk_features` would call, f(a, b, c, z) -> features; raises on bad or unavailable names."""
    _check_choice("numerics", numerics, NUMERICS)
    _check_choice("direction", direction, DIRECTIONS)
    implementation = DISPATCHER.choose(implementation)
    return _TABLE[(numerics, None if numerics == "reference" else direction, implementation)]


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
    implementation: None (the default: "scan" on CPU, "pallas" on a CUDA GPU >= sm_80, "xla" on other
      accelerators), "pallas" (Pallas/Triton kernels; native numerics: exact backward kernels; reference numerics:
      the sweeps in a kernel, the rest and the heuristic backward in XLA; raises PallasUnavailableError where they
      cannot run), "xla" (parallel scans), "scan" (sequential lax.scan, exact autodiff gradients; for reference
      numerics the same as "xla") or "reference" (sequential lax.scan for native; for reference numerics, the exact
      complex128 forward run on the host through a callback: slow).
    b, c and z never receive gradients.
    """
    return resolve(numerics, direction, implementation)(a, b, c, z)
