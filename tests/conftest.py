import os
from pathlib import Path

import jax
import pytest

from phase1_jax.kernels import _pallas_backend

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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where the Pallas kernels run compiled (a CUDA GPU >= sm_80)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    ok, what = _pallas_backend.gpu_status() if gpu_tests else (True, "")
    if not ok:
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU >= sm_80 ({what})"))


# Dispatcher tests pretend other hardware; `_WARNED` is reset so that each sees its own once-only warnings.

@pytest.fixture
def pallas_unavailable(monkeypatch):
    """The Pallas kernels cannot run here (as on a CPU, or a GPU older than sm_80)."""
    monkeypatch.setattr(_pallas_backend, "gpu_status", lambda: (False, "no CUDA GPU >= sm_80 (test)"))
    monkeypatch.setattr(_pallas_backend, "_WARNED", set())


@pytest.fixture
def pallas_available(monkeypatch):
    """The Pallas kernels could run here (only for dispatch decisions: nothing compiled may be called)."""
    monkeypatch.setattr(_pallas_backend, "gpu_status", lambda: (True, "a CUDA GPU >= sm_80 (test)"))
    monkeypatch.setattr(_pallas_backend, "_WARNED", set())


@pytest.fixture
def gpu_backend(monkeypatch):
    """JAX's default backend reads "gpu" (the dispatchers ask it; computations still run where they run)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
