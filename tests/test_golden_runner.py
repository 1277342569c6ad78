"""The golden runner reproduces every case in shared/golden, from the command line, within 1e-5."""

import os

import numpy as np
import pytest

from conftest import GOLDEN_DIR, golden_cases
from phase1_jax.converters.golden import main

CASES = golden_cases("")


def _compare(name, got, want):
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    assert got.shape == want.shape, f"{name}: shape {got.shape} vs {want.shape}"
    assert err <= 1e-5 * max(scale, 1.0) if name in ("logits", "bk_features") else err <= 1e-5 * scale, \
        f"{name}: max error {err:.3e} (scale {scale:.3e})"


def test_cases_present():
    if not CASES and os.environ.get("CI"):
        pytest.fail(f"no golden cases under {GOLDEN_DIR}")


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_golden_runner_reproduces_case(case_dir, tmp_path):
    assert main([str(case_dir), str(tmp_path)]) == 0
    for expected in sorted(case_dir.glob("expected_*")):
        name = expected.name[len("expected_"):].rsplit(".", 1)[0]
        if expected.suffix == ".npz":
            want, got = np.load(expected), np.load(tmp_path / f"{name}.npz")
            assert set(got.files) == set(want.files), name
            for key in want.files:
                _compare(f"{name}[{key}]", got[key], want[key])
        else:
            _compare(name, np.load(tmp_path / f"{name}.npy"), np.load(expected))


def test_golden_runner_rejects_unknown_kind(tmp_path, capsys):
    (tmp_path / "case").mkdir()
    (tmp_path / "case" / "case.json").write_text('{"kind": "transformer", "inputs": [], "outputs": []}')
    assert main([str(tmp_path / "case"), str(tmp_path / "out")]) == 2
    assert "transformer" in capsys.readouterr().err
