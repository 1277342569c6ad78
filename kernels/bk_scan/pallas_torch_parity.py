"""BK-Core torch-parity numerics (numerics="reference": the PyTorch reference's values, overflow cliff included)
with its sweeps as a Pallas (Triton) GPU kernel.

Not to be confused with `reference.py`, the slow, obvious oracles the tests compare against: this module is a fast
kernel whose job is to reproduce the PyTorch model's numerics, which the API calls "reference" numerics.

Reference numerics (`xla.reference_mode_features`) spend their time in `xla._mobius_prefix_scan`: per position t the
second column of P_t = M_t ... M_0, M_t = [[0, 1], [-k_t, d_t]], i.e. the pair of leading principal minors
(theta_t, theta_{t+1}), as float32 mantissas times 2**(int32 exponent), for three stacked sweeps (theta, psi, phi).
XLA builds it by recursive doubling, O(N log N) work over 8-plane matrices. `mobius_prefix_scan_pallas` computes
the same values with O(N) work as a chunked three-phase scan (the layout of `pallas_backward.py`):

  1. chunk maps:  one lane per (row, chunk) multiplies the chunk's 2x2 complex step matrices, renormalised by an
                  exact power of two once per 8 steps; writes the product (8 floats) and its exponent (int32);
  2. carries:     one lane per row applies the chunk maps in order to the start state (theta_{-1}, theta_0) =
                  (0, 1), renormalising after each chunk, and writes the state entering every chunk (4 floats and an
                  exponent); records are chunk-major, (chunks * fields, R), so these row lanes access them coalesced;
  3. values:      one lane per (row, chunk) restarts from its entering state and steps (p, q) -> (q, d q - k p)
                  through the chunk, writing at each position the pair (q, n) scaled by the power of two that brings
                  its largest |Re|/|Im| into [0.5, 1), and the exponent that undoes the scale.

Mantissas are normalised per position exactly as XLA normalises its products (the first column of P_t is zero, so
XLA's max over the whole matrix is the max over this pair), so both paths agree to float32 rounding and their
exponents are equal except where the largest entry sits within rounding of a power of two (then they differ by
one, with mantissas halved or doubled to match). Exponents are exact integers; mantissas carry the rounding of an
O(N)-step sequential recurrence instead of an O(log N)-level product tree, so the two differ by ~1e-6 relative
(a few 1e-5 on long, ill-conditioned rows): this is what can move an overflow-cliff decision that lies within that
margin of 2**1024 (see `_reference_mode_resolvent`).

Everything else of reference numerics, the combination of the sweeps into G, the cliff tests, the eps, NaN-zeroing
and 50-clip, is `xla._reference_mode_resolvent` itself, run with this kernel as its prefix scan
(`xla.reference_mode_features_from_scan`), so the two paths share every line of that logic. The backward is the
reference's heuristic gradient, elementwise XLA from G and the cotangent (`reference_heuristic_grad`): the kernel
is never differentiated and has no backward kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _pallas_backend as backend
from . import xla
from .complex_planes import normalise_with_exponent
from .config import BkScanConfig

F32 = jnp.float32
I32 = jnp.int32
# Steps between renormalisations of a running state: entries grow at most (|Re d| + |Im d| + |k|) per step, which
# is < 1.5e4 for |a - z| + |k| <= 1e4, and (1.5e4)**8 ~ 2**111 stays far below the float32 limit 2**128.
RENORMALISE_EVERY = 8
_MAP_FIELDS = 8     # x0, y0, x1, y1 (complex): the images of (1, 0) and (0, 1) under a chunk's product
_STATE_FIELDS = 4   # p, q (complex): (theta_{t-1}, theta_t) entering a chunk


class _Geometry:
    """Static sizes and position arithmetic: R rows of N positions, chunks of `chunk` steps, vector-blocks of V.

    Positions past the end are masked; in interpret mode they are also moved out of bounds (to N), because the
    Pallas interpreter writes masked-off elements back with their old values, which could race with real writes.
    """

    def __init__(self, *, rows, n, chunk, vector, interpret):
        self.rows, self.n, self.chunk, self.vector = rows, n, chunk, vector
        self.interpret = interpret
        self.chunks = -(-n // chunk)
        self.blocks = chunk // vector

    def lanes(self, lanes_per_program):
        lane = backend.program_id(0) * lanes_per_program + jnp.arange(lanes_per_program, dtype=I32)
        ok = lane < self.rows * self.chunks
        # Lanes past the end get row = R, out of bounds, so their masked accesses never alias a real element.
        return jnp.where(ok, lane // self.chunks, self.rows), jnp.where(ok, lane % self.chunks, 0), ok

    def row_block(self, rows_per_program):
        row = backend.program_id(0) * rows_per_program + jnp.arange(rows_per_program, dtype=I32)
        return row, row < self.rows

    def positions(self, chunk, block, ok):
        """(positions (lanes, V), valid) of vector-block `block` of each lane's chunk."""
        pos = (chunk * self.chunk + block * self.vector)[:, None] + jnp.arange(self.vector, dtype=I32)[None]
        valid = (pos < self.n) & ok[:, None]
        if self.interpret:
            pos = jnp.where(valid, pos, self.n)
        return pos, valid

    def loader(self, refs, row, chunk, ok):
        """load(block) -> one (lanes, V) tile per input ref (zeros past the end)."""
        def load(block):
            pos, valid = self.positions(chunk, block, ok)
            return tuple(backend.load(ref.at[row[:, None], pos], mask=valid, other=0.0).astype(F32) for ref in refs)

        return load


def _load_record(ref, exp_ref, row, row_ok, chunk, width, chunks):
    """Record `chunk` (its `width` float fields and its exponent) for a vector of rows, from chunk-major arrays."""
    ok = row_ok & (chunk < chunks)
    fields = [backend.load(ref.at[chunk * width + j, row], mask=ok, other=0.0) for j in range(width)]
    return fields, backend.load(exp_ref.at[chunk, row], mask=ok, other=0)


def _store_record(ref, exp_ref, row, row_ok, chunk, width, chunks, fields, exponent):
    ok = row_ok & (chunk < chunks)
    for j, value in enumerate(fields):
        backend.store(ref.at[chunk * width + j, row], value, mask=ok)
    backend.store(exp_ref.at[chunk, row], exponent, mask=ok)


# ------------------------------------------------------------------------------------------------------ kernels

def _chunk_maps_kernel(d_re_ref, d_im_ref, k_ref, maps_ref, map_exp_ref, *, geo, lanes):
    row, chunk, ok = geo.lanes(lanes)

    def compute(block, tiles, state):
        d_re, d_im, kap = (backend.columns(t) for t in tiles)
        (x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i), exponent = state
        for j in range(geo.vector):
            # Each column (x, y) -> (y, d y - k x).
            n0r = d_re[j] * y0r - d_im[j] * y0i - kap[j] * x0r
            n0i = d_re[j] * y0i + d_im[j] * y0r - kap[j] * x0i
            n1r = d_re[j] * y1r - d_im[j] * y1i - kap[j] * x1r
            n1i = d_re[j] * y1i + d_im[j] * y1r - kap[j] * x1i
            x0r, x0i, y0r, y0i = y0r, y0i, n0r, n0i
            x1r, x1i, y1r, y1i = y1r, y1i, n1r, n1i
            if (j + 1) % RENORMALISE_EVERY == 0 or j == geo.vector - 1:
                (x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i), exponent = normalise_with_exponent(
                    [x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i], exponent)
        return (x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i), exponent

    one, zero = jnp.ones((lanes,), F32), jnp.zeros((lanes,), F32)
    identity = (one, zero, zero, zero, zero, zero, one, zero)
    planes, exponent = backend.pipelined_loop(geo.blocks, geo.loader((d_re_ref, d_im_ref, k_ref), row, chunk, ok),
                                              compute, (identity, jnp.zeros((lanes,), I32)))
    _store_record(maps_ref, map_exp_ref, row, ok, chunk, _MAP_FIELDS, geo.chunks, planes, exponent)


def _carry_kernel(maps_ref, map_exp_ref, states_ref, state_exp_ref, *, geo, rows, vb):
    row, row_ok = geo.row_block(rows)

    def load(block):
        return [_load_record(maps_ref, map_exp_ref, row, row_ok, block * vb + c, _MAP_FIELDS, geo.chunks)
                for c in range(vb)]

    def compute(block, maps, state):
        (pr, pi, qr, qi), exponent = state
        for c in range(vb):
            _store_record(states_ref, state_exp_ref, row, row_ok, block * vb + c, _STATE_FIELDS, geo.chunks,
                          (pr, pi, qr, qi), exponent)
            (x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i), map_exponent = maps[c]
            npr = x0r * pr - x0i * pi + x1r * qr - x1i * qi
            npi = x0r * pi + x0i * pr + x1r * qi + x1i * qr
            nqr = y0r * pr - y0i * pi + y1r * qr - y1i * qi
            nqi = y0r * pi + y0i * pr + y1r * qi + y1i * qr
            # Map entries are <= 1, so a normalised state grows at most 4x per chunk before this renormalisation.
            (pr, pi, qr, qi), exponent = normalise_with_exponent([npr, npi, nqr, nqi], exponent + map_exponent)
        return (pr, pi, qr, qi), exponent

    zero, one = jnp.zeros((rows,), F32), jnp.ones((rows,), F32)
    backend.pipelined_loop(-(-geo.chunks // vb), load, compute, ((zero, zero, one, zero), jnp.zeros((rows,), I32)))


def _values_kernel(d_re_ref, d_im_ref, k_ref, states_ref, state_exp_ref,
                   theta_re_ref, theta_im_ref, next_re_ref, next_im_ref, exp_ref, *, geo, lanes):
    row, chunk, ok = geo.lanes(lanes)
    start = _load_record(states_ref, state_exp_ref, row, ok, chunk, _STATE_FIELDS, geo.chunks)

    def compute(block, tiles, state):
        d_re, d_im, kap = (backend.columns(t) for t in tiles)
        (pr, pi, qr, qi), exponent = state
        outputs = [[None] * geo.vector for _ in range(5)]
        for j in range(geo.vector):
            nr = d_re[j] * qr - d_im[j] * qi - kap[j] * pr
            ni = d_re[j] * qi + d_im[j] * qr - kap[j] * pi
            # The output pair, normalised on its own: off the recurrence's dependency chain.
            planes, out_exponent = normalise_with_exponent([qr, qi, nr, ni], exponent)
            for field, value in enumerate((*planes, out_exponent)):
                outputs[field][j] = value
            pr, pi, qr, qi = qr, qi, nr, ni
            if (j + 1) % RENORMALISE_EVERY == 0 or j == geo.vector - 1:
                (pr, pi, qr, qi), exponent = normalise_with_exponent([pr, pi, qr, qi], exponent)
        pos, valid = geo.positions(chunk, block, ok)
        for ref, columns in zip((theta_re_ref, theta_im_ref, next_re_ref, next_im_ref, exp_ref), outputs):
            backend.store(ref.at[row[:, None], pos], backend.tile(columns), mask=valid)
        return (pr, pi, qr, qi), exponent

    backend.pipelined_loop(geo.blocks, geo.loader((d_re_ref, d_im_ref, k_ref), row, chunk, ok), compute,
                           (tuple(start[0]), start[1]))


# ----------------------------------------------------------------------------------------------------- launches

def _resolve_config(config, interpret):
    backend.require("bk_scan", interpret, alternatives="'xla', 'scan' or 'reference'")
    return BkScanConfig() if config is None else config


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def mobius_prefix_scan_pallas(d_re, d_im, coupling, *, config: BkScanConfig | None = None, interpret: bool = False):
    """What `xla._mobius_prefix_scan(d_re, d_im, coupling)` returns, from three Pallas kernels (module docstring).

    d_re, d_im, coupling: (R, N) float32, coupling[:, 0] = 0 (ignored anyway). Returns (theta_re, theta_im, next_re,
    next_im, exponent), (R, N) float32 x4 and int32: (theta_t, theta_{t+1}) = (theta + i theta_im,
    next_re + i next_im) * 2**exponent, the mantissas' largest |Re|/|Im| in [0.5, 1). Not differentiable.
    """
    config = _resolve_config(config, interpret)
    d_re, d_im, coupling = (jnp.asarray(x, F32) for x in (d_re, d_im, coupling))
    if d_re.ndim != 2 or d_im.shape != d_re.shape or coupling.shape != d_re.shape:
        raise ValueError(f"d_re, d_im and coupling must have one shape (R, N), got {d_re.shape}, {d_im.shape} "
                         f"and {coupling.shape}")
    rows, n = d_re.shape
    geo = _Geometry(rows=rows, n=n, chunk=config.chunk_for(n), vector=config.vector, interpret=bool(interpret))

    def launch(kernel, out_shape, name, per_row=False, **params):
        if per_row:
            grid, warps = (-(-rows // config.carry_rows),), config.carry_warps
        else:
            grid, warps = (-(-rows * geo.chunks // config.lanes),), config.num_warps
        return backend.pallas_call(functools.partial(kernel, geo=geo, **params), out_shape=out_shape, grid=grid,
                                   num_warps=warps, num_stages=config.num_stages, interpret=bool(interpret),
                                   name=name)

    def records(width, dtype):
        return jax.ShapeDtypeStruct((geo.chunks * width, rows), dtype)

    inputs = (d_re, d_im, coupling)
    maps = launch(_chunk_maps_kernel, (records(_MAP_FIELDS, F32), records(1, I32)), "bk_reference_maps",
                  lanes=config.lanes)(*inputs)
    states = launch(_carry_kernel, (records(_STATE_FIELDS, F32), records(1, I32)), "bk_reference_carry",
                    per_row=True, rows=config.carry_rows, vb=config.carry_vector)(*maps)
    planes = jax.ShapeDtypeStruct((rows, n), F32)
    return launch(_values_kernel, (planes,) * 4 + (jax.ShapeDtypeStruct((rows, n), I32),), "bk_reference_values",
                  lanes=config.lanes)(*inputs, *states)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def reference_mode_features_pallas(a, b=None, c=None, z=1j, *, config: BkScanConfig | None = None,
                                   interpret: bool = False):
    """`xla.reference_mode_features` with its three sweeps computed by `mobius_prefix_scan_pallas`.

    Same contract: a (B, N) float32, b, c (N-1,) or (B, N-1) or None (ones), z complex scalar; features (B, N, 2)
    float32 = [Re G, Im G] of the PyTorch reference, overflow cliff included; backward: the reference's heuristic
    gradient for `a` (elementwise XLA), zero cotangents for b, c and z. Raises PallasUnavailableError unless a CUDA
    GPU >= sm_80 is present or interpret=True.
    """
    config = _resolve_config(config, interpret)
    prefix_scan = functools.partial(mobius_prefix_scan_pallas, config=config, interpret=bool(interpret))
    return xla.reference_mode_features_from_scan(a, b, c, z, prefix_scan)
