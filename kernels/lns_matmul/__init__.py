"""Matrix product in the logarithmic number system (LNS): inputs as (log|x|, sign x), output as float32.

Inference-only: see `api.lns_matmul` for the exact definitions of the "max_log" and "exact" algorithms.
"""

from .api import ALGORITHMS, IMPLEMENTATIONS, available_implementations, lns_matmul, to_lns

__all__ = ["ALGORITHMS", "IMPLEMENTATIONS", "available_implementations", "lns_matmul", "to_lns"]
