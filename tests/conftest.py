import os
from pathlib import Path

import jax
import numpy as np
import pytest

# The golden cases live in the workspace's shared/ folder beside the repository (CI lays it out the same way).
GOLDEN_DIR = Path(os.environ.get("PHASE1_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))
# Reference training runs: batches, losses and gradient norms per step, parameters every few steps.
GOLDEN_TRAINING_DIR = Path(os.environ.get("PHASE1_GOLDEN_TRAINING_DIR",
                                          Path(__file__).resolve().parents[2] / "shared" / "golden_training"))

# Float32 matmuls at full precision everywhere (GPUs default to TF32, which would blur parity checks).
jax.config.update("jax_default_matmul_precision", "highest")


def golden_cases(prefix: str) -> list[Path]:
    return sorted(p for p in GOLDEN_DIR.glob(f"{prefix}*") if (p / "case.json").is_file())


def golden_training_cases() -> list[Path]:
    return sorted(p for p in GOLDEN_TRAINING_DIR.glob("*") if (p / "case.json").is_file())


@pytest.fixture
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden cases not found at {GOLDEN_DIR}")
    return GOLDEN_DIR


def rel_err(x, y):
    """max |x - y| / max |y| in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))


def elementwise_rel_err(features, exact):
    """Largest elementwise relative error of (..., 2) [Re, Im] features against complex values."""
    f = np.asarray(features, np.float64)
    return float(np.max(np.abs(f[..., 0] + 1j * f[..., 1] - exact) / np.abs(exact)))
