"""BK-Core: the diagonal of the resolvent of a tridiagonal Hamiltonian, as (Re G, Im G) features.

`bk_features` dispatches between the reference semantics (PyTorch-compatible, overflow cliff and heuristic gradient
included) and native ones (causal or bidirectional, finite at any length, exact gradients).
"""

from .api import IMPLEMENTATIONS, available_implementations, bk_features, resolve
from .reference import (
    bidirectional_numpy,
    bidirectional_scan_reference,
    causal_numpy,
    causal_scan_reference,
    dense_bidirectional_numpy,
    dense_causal_numpy,
    reference_heuristic_grad,
    reference_heuristic_grad_numpy,
    reference_mode_features_host,
    reference_mode_forward_numpy,
)
from .xla import bidirectional_features, causal_features, reference_mode_features

__all__ = [
    "IMPLEMENTATIONS",
    "available_implementations",
    "bk_features",
    "bidirectional_features",
    "bidirectional_numpy",
    "bidirectional_scan_reference",
    "causal_features",
    "causal_numpy",
    "causal_scan_reference",
    "dense_bidirectional_numpy",
    "dense_causal_numpy",
    "reference_heuristic_grad",
    "reference_heuristic_grad_numpy",
    "reference_mode_features",
    "reference_mode_features_host",
    "reference_mode_forward_numpy",
    "resolve",
]
