"""Helpers shared by the kernel tests: `from helpers import ...` (pytest puts tests/ on sys.path).

Kernel test tiers, as pytest markers (registered in pyproject.toml): `interpret` (the Pallas kernels against the
references in float32, values and gradients: in the Pallas interpreter on a CPU, compiled on a GPU), `bf16` (the
bf16 error bound) and `gpu` (compiled kernels at full size; conftest.py skips them without a GPU that runs the
kernels).
"""

import jax
import numpy as np
import pytest

from phase1_jax.kernels import _pallas_backend

ON_GPU = jax.default_backend() == "gpu"
# Off a GPU the kernels run in the Pallas interpreter: the same kernel bodies, executed by XLA.
INTERPRET = not ON_GPU
# Whether implementation=None means "pallas" here (a CUDA GPU >= sm_80).
KERNELS_RUN_HERE = _pallas_backend.available()

# Lowering a Triton kernel warns that the backend is deprecated (see _pallas_backend); expected in kernel tests.
IGNORE_TRITON_DEPRECATION = pytest.mark.filterwarnings(
    f"ignore:{_pallas_backend.TRITON_DEPRECATION}:DeprecationWarning")


def rel_err(x, y):
    """max |x - y| / max |y| in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))


def elementwise_rel_err(features, exact):
    """Largest elementwise relative error of (..., 2) [Re, Im] features against complex values."""
    f = np.asarray(features, np.float64)
    return float(np.max(np.abs(f[..., 0] + 1j * f[..., 1] - exact) / np.abs(exact)))


def lns_inputs(a, b):
    """float32 (log|x|, sign x) of A and B computed in numpy (log 0 = -inf)."""
    with np.errstate(divide="ignore"):
        return (np.log(np.abs(a)).astype(np.float32), np.sign(a).astype(np.float32),
                np.log(np.abs(b)).astype(np.float32), np.sign(b).astype(np.float32))


def max_log_by_loops(la, sa, lb, sb):
    """The max_log LNS matmul's definition, literally: for each (m, n) the first k with the largest float32 term."""
    M, K = la.shape
    N = lb.shape[1]
    out = np.zeros((M, N), np.float32)
    for m in range(M):
        for n in range(N):
            best, k_best = -np.inf, 0
            for k in range(K):
                t = np.float32(la[m, k]) + np.float32(lb[k, n])
                if t > best:  # strict: the first maximum wins ties
                    best, k_best = t, k
            out[m, n] = sa[m, k_best] * sb[k_best, n] * np.exp(np.float64(best))
    return out


def single_line_naming(message: str, *names: str) -> bool:
    """Whether an error message is one line that names every one of `names` (quoted, as the dispatchers do)."""
    return "\n" not in message and all(f"'{name}'" in message for name in names)
