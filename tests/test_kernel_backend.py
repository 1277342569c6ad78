"""What the kernel ops share: the Pallas backend (kernels/_pallas_backend.py) and the dispatcher (kernels/dispatch.py).

Each op's own dispatch (its names, defaults and fallbacks on this device) is tested in the op's test file.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import IGNORE_TRITON_DEPRECATION, INTERPRET, single_line_naming
from phase1_jax.kernels import _pallas_backend
from phase1_jax.kernels.dispatch import Dispatcher

pytestmark = IGNORE_TRITON_DEPRECATION


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_backend_reports_the_gpu():
    # On any CUDA GPU (the `gpu` tests need sm_80 and are skipped below it; this one says why).
    ok, what = _pallas_backend.gpu_status()
    assert ok, what


def _matrix_scan_kernel(lanes, reverse):
    """A kernel scanning (4, lanes) real 2x2 matrices (rows m00, m01, m10, m11) across its lanes: later @ earlier."""
    def combine(earlier, later):
        e00, e01, e10, e11 = earlier
        l00, l01, l10, l11 = later
        return (l00 * e00 + l01 * e10, l00 * e01 + l01 * e11, l10 * e00 + l11 * e10, l10 * e01 + l11 * e11)

    def kernel(x_ref, o_ref):
        lane = jnp.arange(lanes)
        planes = tuple(_pallas_backend.load(x_ref.at[j, lane]) for j in range(4))
        for j, plane in enumerate(_pallas_backend.associative_scan(combine, planes, reverse=reverse)):
            _pallas_backend.store(o_ref.at[j, lane], plane)

    return _pallas_backend.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((4, lanes), jnp.float32), grid=(1,),
                                       num_warps=1 if lanes <= 32 else 4, num_stages=1, interpret=INTERPRET,
                                       name="matrix_scan_test")


@pytest.mark.interpret
@pytest.mark.parametrize("lanes", [8, 256])
@pytest.mark.parametrize("reverse", [False, True])
def test_associative_scan_keeps_the_order_of_a_non_commutative_combine(lanes, reverse):
    # The in-register lane scan of the BK kernels (one tt.scan when compiled). Matrix products do not commute, so
    # a combine applied in the wrong order (or a reverse scan read the wrong way) fails.
    # Rotations with a random shear: products stay O(1) over 256 factors, and no two factors commute.
    rng = np.random.default_rng(lanes)
    angle, shear = rng.uniform(0, 2 * np.pi, lanes), rng.uniform(-0.3, 0.3, lanes)
    x = np.stack([np.cos(angle) + shear, -np.sin(angle), np.sin(angle), np.cos(angle) - shear]).astype(np.float32)
    got = np.asarray(jax.jit(_matrix_scan_kernel(lanes, reverse))(x))
    mats = x.T.reshape(lanes, 2, 2).astype(np.float64)
    want, acc = np.zeros_like(mats), None
    for i in (range(lanes - 1, -1, -1) if reverse else range(lanes)):
        acc = mats[i] if acc is None else mats[i] @ acc
        want[i] = acc
    want = want.reshape(lanes, 4).T
    assert np.max(np.abs(got - want)) <= 1e-4 * np.abs(want).max()


# ------------------------------------------------------------------------------------------------ dispatcher

OP = Dispatcher("test_op", ("xla", "scan", "reference", "pallas"), cpu_default="scan")


def test_dispatcher_names_and_validation():
    assert OP.choices == (None, "xla", "scan", "reference", "pallas")
    assert OP.choose("reference") == "reference"
    with pytest.raises(ValueError, match="test_op: implementation='triton' is not valid") as error:
        OP.choose("triton")
    assert single_line_naming(str(error.value), "xla", "scan", "reference", "pallas")
    with pytest.raises(ValueError, match="fallback"):
        Dispatcher("bad_op", ("xla", "pallas"), fallback="scan")
    with pytest.raises(ValueError, match="'pallas'"):
        Dispatcher("bad_op", ("xla",))


def test_dispatcher_without_kernels(pallas_unavailable):
    assert OP.available() == ("xla", "scan", "reference")
    with pytest.raises(_pallas_backend.PallasUnavailableError) as error:
        OP.check("pallas")
    message = str(error.value)
    assert single_line_naming(message, "xla", "scan", "reference") and "'xla', 'scan' or 'reference'" in message
    with pytest.raises(_pallas_backend.PallasUnavailableError, match="implementation='xla', or implementation=None"):
        Dispatcher("two_op", ("xla", "pallas")).check("pallas")


def test_dispatcher_default_on_a_cpu(monkeypatch, pallas_available):
    # The CPU default, silently, even where the kernels could run.
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert OP.choose(None) == "scan"
        assert OP.choose(None, supports=lambda: pytest.fail("asked on a CPU")) == "scan"


def test_dispatcher_default_on_a_gpu(gpu_backend, pallas_available):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert OP.choose(None) == "pallas"
        assert OP.choose(None, supports=lambda: (True, "")) == "pallas"
        assert OP.available() == ("xla", "scan", "reference", "pallas")
    # An input the kernel cannot take: the fallback, with one warning per reason.
    def warnings_for(reason):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert OP.choose(None, supports=lambda: (False, reason)) == "xla"
        return [str(w.message) for w in caught]

    first = warnings_for("odd input")
    assert len(first) == 1 and "falls back from 'pallas' to 'xla' here (odd input)" in first[0]
    assert warnings_for("odd input") == []
    assert len(warnings_for("other input")) == 1


def test_dispatcher_default_on_a_gpu_without_kernels(gpu_backend, pallas_unavailable):
    with pytest.warns(RuntimeWarning, match="test_op: the default implementation falls back from 'pallas' to 'xla'"):
        assert OP.choose(None) == "xla"
