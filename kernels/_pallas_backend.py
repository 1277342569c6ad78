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
import jax.extend.core
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


def default_is_pallas(op: str, supported: tuple[bool, str] = (True, ""), stacklevel: int = 2) -> bool:
    """Whether implementation=None means the Pallas kernels for `op` here (asked by `dispatch.Dispatcher`).

    On a CPU (or any non-GPU backend) the default is the XLA path by design, silently. On a GPU it is Pallas when
    the kernels can run and take these inputs (`supported` = (ok, reason)); otherwise the default falls back to
    XLA and says so once per (op, reason), with the warning attributed `stacklevel` frames up.
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
                      RuntimeWarning, stacklevel=stacklevel)
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


def split_leading_ref(refs, present: bool):
    """(refs[0], refs[1:]) for a kernel whose first input exists only in some configurations, else (None, refs)."""
    return (refs[0], refs[1:]) if present else (None, refs)


def columns(tile):
    """(n, W) -> W arrays (n,), W a power of two: split by two-way unstacks, which is what the Triton lowering
    supports (slicing a column out of a register tile is not)."""
    n, width = tile.shape
    if width == 1:
        return [tile.reshape(n)]
    even, odd = jax.lax.unstack(tile.reshape(n, width // 2, 2), axis=-1)
    out = [None] * width
    out[0::2] = columns(even)
    out[1::2] = columns(odd)
    return out


def tile(cols):
    """Inverse of `columns`: W arrays (n,) -> (n, W)."""
    width = len(cols)
    n = cols[0].shape[0]
    if width == 1:
        return cols[0].reshape(n, 1)
    pair = jax.lax.stack([tile(cols[0::2]), tile(cols[1::2])], axis=-1)
    return pair.reshape(n, width)


def reciprocal(x, *, interpret: bool):
    """1 / x for float32, as one `rcp.approx.ftz.f32` in compiled kernels (the SFU's reciprocal: at most 1 ulp of
    error, subnormal inputs and results flushed to zero, 1/0 = inf). A float32 division in a Triton kernel is
    `div.full.f32`: the same approximation plus range scaling around it. The interpreter divides exactly."""
    if interpret:
        return 1.0 / x
    (out,) = plgpu.elementwise_inline_asm("rcp.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return out


# --------------------------------------------------------------------------------------------------------------
# associative_scan: an in-register scan across the lanes of a program, with any associative combine.
#
# Pallas lowers only `cumsum` to Triton's scan op (`tt.scan`, warp shuffles plus shared memory across warps); the
# BK kernels need the same op over 2x2 complex matrices. `associative_scan` is a primitive of our own: inside a
# compiled kernel it becomes one `tt.scan` whose combine region is the traced `combine`; everywhere else
# (interpret mode, plain XLA) it is `lax.associative_scan`. Its Triton rule reaches into Pallas internals
# (`jax._src.pallas.triton.lowering`), which is why it lives here, beside the other backend decisions; the rule is
# checked by tests/test_kernel_backend.py (interpreted on a CPU, compiled on the GPU) and by the ops' lowering tests.
# --------------------------------------------------------------------------------------------------------------

_scan_p = jax.extend.core.Primitive("phase1_associative_scan")
_scan_p.multiple_results = True


def associative_scan(combine, operands, *, reverse: bool = False):
    """Inclusive scan along axis 0 of the 1-D arrays `operands` (a tuple) with an associative `combine`.

    combine(earlier, later) -> tuple takes and returns tuples of scalars (elementwise jnp/lax code, no array
    constants); "earlier" is the element nearer the start of the scan (the higher index when `reverse`), as in
    `lax.associative_scan`.
    """
    operands = tuple(operands)
    if not operands or any(x.ndim != 1 or x.shape != operands[0].shape for x in operands):
        raise ValueError(f"associative_scan wants 1-D operands of one shape, got {[x.shape for x in operands]}")
    return tuple(_scan_p.bind(*operands, combine=combine, reverse=bool(reverse)))


def _scan_impl(*operands, combine, reverse):
    return list(jax.lax.associative_scan(lambda a, b: tuple(combine(tuple(a), tuple(b))), tuple(operands),
                                         reverse=reverse))


_scan_p.def_impl(_scan_impl)
_scan_p.def_abstract_eval(lambda *avals, combine, reverse: list(avals))


def _register_xla_lowering():
    from jax.interpreters import mlir

    mlir.register_lowering(_scan_p, mlir.lower_fun(_scan_impl, multiple_results=True))


def _register_triton_lowering():
    """Lower `associative_scan` to one tt.scan; a jax without the internals used here keeps the XLA form only."""
    try:
        from jax._src.lib.mlir import ir
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as triton_lowering
    except ImportError:  # pragma: no cover - depends on the installed jax
        return

    def rule(ctx, *operands, combine, reverse):
        count = len(operands)
        scalars = [jax.ShapeDtypeStruct((), aval.dtype) for aval in ctx.avals_in]

        def flat(*args):
            return list(combine(tuple(args[:count]), tuple(args[count:])))

        closed = jax.make_jaxpr(flat)(*scalars, *scalars)
        if closed.consts:
            raise NotImplementedError("associative_scan: the combine function must not close over arrays")
        element_types = [ir.RankedTensorType(x.type).element_type for x in operands]
        scan = tt_dialect.ScanOp(list(operands), 0, reverse)
        block = scan.regions[0].blocks.append(*element_types, *element_types)
        with ir.InsertionPoint.at_block_begin(block):
            tt_dialect.scan_return(
                triton_lowering.lower_jaxpr_to_triton_ir(ctx.context, closed.jaxpr, None, *block.arguments))
        scan.verify()
        return list(scan.result)

    triton_lowering.triton_lowering_rules[_scan_p] = rule


_register_xla_lowering()
_register_triton_lowering()
