"""AR-SSM scan op: ctx = cumsum_t(u ⊙ g) ⊙ (v ⊙ g), causal or reverse (REFERENCE_SPEC §2.2 steps 3–5, §2.4)."""

from .api import IMPLEMENTATIONS, ar_ssm_scan, available_implementations
from .reference import ar_ssm_scan_reference
from .xla import DEFAULT_CHUNK_SIZE, ar_ssm_scan_xla, chunked_cumsum

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IMPLEMENTATIONS",
    "ar_ssm_scan",
    "ar_ssm_scan_reference",
    "ar_ssm_scan_xla",
    "available_implementations",
    "chunked_cumsum",
]
