"""A built wheel ships all three top-level folders, installed as phase1_jax, phase1_jax.kernels, .converters."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("phase1_jax-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every package directory of the source tree must be in the wheel under its installed name.
    for top, installed in (("phase1_jax", "phase1_jax"), ("kernels", "phase1_jax/kernels"),
                           ("converters", "phase1_jax/converters")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.relative_to(ROOT / top).parent
            package = f"{installed}/{rel}".rstrip("/.") if str(rel) != "." else installed
            for module in init.parent.glob("*.py"):
                assert f"{package}/{module.name}" in names, f"{package}/{module.name} missing from the wheel"
    assert not any(n.startswith("kernels/") for n in names), "a top-level 'kernels' package would collide"
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    assert entry_points and "phase1-jax = phase1_jax.cli:main" in zipfile.ZipFile(wheel).read(
        entry_points[0]).decode()
