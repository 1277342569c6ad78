"""The one place that decides how phase1-jax's Pallas kernels are lowered and when they can run.

Backend: Pallas with the **Triton** lowering (`jax.experimental.pallas.triton`). It is the only Pallas GPU backend
that runs on Ampere and Ada cards (sm_80/86/89: this project's users include 8-10 GB consumer GPUs) as well as on
Hopper; Pallas Mosaic GPU needs sm_90 (wgmma, TMA). Every kernel module builds its `pallas_call` through
`pallas_call` below, loads and stores through `load` / `store`, and asks `require` / `gpu_status` whether the
kernels can run.

jax 0.11 deprecates the Triton lowering and warns ("The Pallas Triton backend is deprecated and will be removed in a
future JAX version.", a DeprecationWarning) each time a Triton `pallas_call` is lowered. The warning is expected and
handled here, deliberately: `pallas_call` installs a filter for exactly that message and category (nothing else is
silenced) every time a kernel is traced. Lowering happens when the enclosing `jit` compiles, after our Python code
has returned, so a filter scoped to our call could not see it; the filter therefore stays for the process. The way
forward (docs/perf/NOTES.md, "Backend"): move the kernels to jax-triton's `triton_call` (same Triton, kept outside
JAX, still sm_80+) or add Pallas Mosaic GPU versions for sm_90+ beside these, before JAX removes the Triton lowering.
"""

from __future__ import annotations

import functools
import warnings

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..errors import HardwareCompatibilityError

BACKEND = "pallas-triton"
# The Triton lowering of Pallas is supported from compute capability 8.0 (Ampere) on.
MIN_COMPUTE_CAPABILITY = (8, 0)
TRITON_DEPRECATION = (r"The Pallas Triton backend is deprecated and will be removed in a future JAX version")


class PallasUnavailableError(HardwareCompatibilityError, NotImplementedError):
    """implementation="pallas" was asked for where the Pallas GPU kernels cannot run (no CUDA GPU >= sm_80).

    Also a NotImplementedError, which is what asking for "pallas" raised before the kernels existed.
    """


def ignore_triton_deprecation() -> None:
    """Filter the Triton-lowering DeprecationWarning of jax >= 0.11, that message only (see the module docstring).

    Re-installed at every trace: `warnings.catch_warnings` blocks (pytest wraps each test in one) restore the
    filter list on exit, and `filterwarnings` replaces an identical entry instead of adding a duplicate.
    """
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


def _compute_capability(device) -> tuple[int, int] | None:
    cc = getattr(device, "compute_capability", None)
    if cc is None:
        return None
    try:
        major, minor = (int(x) for x in str(cc).split(".")[:2])
    except ValueError:
        return None
    return major, minor


@functools.cache
def gpu_status() -> tuple[bool, str]:
    """(whether the compiled kernels can run on the default backend, a description of what is there)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return False, f"default JAX backend is {backend!r}, not a CUDA GPU"
    device = jax.devices()[0]
    if getattr(device, "platform", "") != "gpu" or "rocm" in str(getattr(device, "client", "")).lower():
        return False, f"device {device} is not a CUDA GPU"
    cc = _compute_capability(device)
    if cc is None:
        return False, f"device {device} does not report a compute capability"
    if cc < MIN_COMPUTE_CAPABILITY:
        return False, f"{device.device_kind} has compute capability {cc[0]}.{cc[1]} < 8.0"
    return True, f"{device.device_kind} (sm_{cc[0]}{cc[1]})"


def available() -> bool:
    return gpu_status()[0]


def require(op: str, interpret: bool, alternatives: str = "'xla'") -> None:
    """Raise PallasUnavailableError unless the kernels of `op` can run (compiled on a GPU, or interpreted)."""
    if interpret:
        return
    ok, what = gpu_status()
    if not ok:
        raise PallasUnavailableError(
            required=f"{op}: implementation='pallas' is not available here: it needs a CUDA GPU of compute "
                     f"capability >= 8.0 ({BACKEND}); on a CPU, call the kernel module with interpret=True "
                     f"(tests only: slow)",
            available=what,
            fallback=f"implementation={alternatives}, or implementation=None (the default: XLA on CPU, Pallas "
                     f"on a GPU)")


_WARNED: set[tuple[str, str]] = set()


def default_is_pallas(op: str, supported: tuple[bool, str] = (True, "")) -> bool:
    """Whether implementation=None means the Pallas kernels for `op` here.

    On a CPU (or any non-GPU backend) the default is the XLA path by design, silently. On a GPU it is Pallas when
    the kernels can run and take these inputs (`supported` = (ok, reason)); otherwise the default falls back to
    XLA and says so once per (op, reason).
    """
    if jax.default_backend() != "gpu":
        return False
    ok, what = gpu_status()
    if ok and supported[0]:
        return True
    reason = what if not ok else supported[1]
    if (op, reason) not in _WARNED:
        _WARNED.add((op, reason))
        warnings.warn(f"{op}: the default implementation falls back from 'pallas' to 'xla' here ({reason})",
                      RuntimeWarning, stacklevel=3)
    return False


def pallas_call(kernel, *, out_shape, grid, num_warps: int, num_stages: int, interpret: bool, name: str):
    """pl.pallas_call with this backend's compiler parameters; every kernel of the package goes through here."""
    ignore_triton_deprecation()
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )


def pipelined_loop(n_blocks, load, compute, state):
    """for i in range(n_blocks): state = compute(i, load(i), state), with the loads of block i + 1 issued before
    the arithmetic of block i (the loaded tiles ride in the loop carry): hand-written software pipelining, so that
    memory latency overlaps the work of the previous block even with few warps per SM.

    The last iteration reloads its own block instead of reading past the end (the values are not used).
    """
    def body(i, carry):
        state, tiles = carry
        upcoming = load(jax.numpy.minimum(i + 1, n_blocks - 1))
        return compute(i, tiles, state), upcoming

    state, _ = jax.lax.fori_loop(0, n_blocks, body, (state, load(0)))
    return state


def load(ref_view, mask=None, other=None):
    """Masked load (masked-off elements read as `other`); `ref_view` is `ref.at[index arrays...]`."""
    return plgpu.load(ref_view, mask=mask, other=other)


def store(ref_view, value, mask=None) -> None:
    plgpu.store(ref_view, value.astype(ref_view.dtype), mask=mask)


program_id = pl.program_id
