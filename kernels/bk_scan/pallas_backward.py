"""BK-Core backward kernels: the exact gradient of the one-sided resolvents, as Pallas (Triton) kernels.

Notation in `pallas.py`, whose custom VJPs call `resolvent_grad`. With upstream w_t = ct_re + i ct_im,

  lambda_t = w_t + A_t lambda_{t+1},  A_t = conj(k_{t+1} g_{t+1}^2),  grad a_t = -Re(conj(lambda_t) g_t^2),

a reverse affine recurrence (for a only; b, c and z get zero cotangents, as in `xla.py`), run as a chunked
three-phase scan: per-(row, chunk) lanes walking their chunk sequentially compute the chunks' affine maps, one
lane per row carries lambda between chunks, and the lanes walk their chunks again writing the gradient
(`_Geometry`; the v4 layout of docs/perf/NOTES.md). `descending=True` differentiates the right continued fraction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _pallas_backend as backend

F32 = jnp.float32


class _Geometry:
    """Static sizes and the position / coupling arithmetic of the backward kernels.

    A lane walks its chunk in vector-blocks of V processing steps. Tiles are always loaded and stored with their
    columns in ascending memory positions, so the V positions of a lane are contiguous for the compiler's
    vectorisation analysis; a descending scan visits the columns of a tile right to left (`order`). Positions of
    steps past the end are left unclamped in compiled kernels (their loads and stores are masked); the Pallas
    interpreter, which writes masked-off elements back with their old values, gets them moved one past the end.
    """

    def __init__(self, *, n, batch, chunk, vector, descending, coupling_rows, interpret):
        self.n, self.batch, self.chunk, self.vector = n, batch, chunk, vector
        self.descending = descending
        self.coupling_rows = coupling_rows  # 0: unit coupling (k = 1 on every bond), 1 or batch: rows of kc
        self.interpret = interpret
        self.chunks = -(-n // chunk)
        # Columns of a tile in processing order.
        self.order = list(reversed(range(vector))) if descending else list(range(vector))

    def lanes(self, lanes_per_program):
        lane = backend.program_id(0) * lanes_per_program + jnp.arange(lanes_per_program, dtype=jnp.int32)
        ok = lane < self.batch * self.chunks
        # Lanes past the end get row = batch: out of bounds, so their masked stores can never alias a real
        # element (the Pallas interpreter writes masked-off elements back with their old values).
        return jnp.where(ok, lane // self.chunks, self.batch), jnp.where(ok, lane % self.chunks, 0), ok

    def positions(self, chunk, block, ok, shift=0):
        """(positions (lanes, V), valid) of vector-block `block` of each lane's chunk, `shift` steps later."""
        base = (chunk * self.chunk + block * self.vector + shift)[:, None]
        j = jnp.arange(self.vector, dtype=jnp.int32)[None]
        if self.descending:
            pos = (self.n - self.vector) - base + j      # step base + V-1-j at position n-1-step
            valid = (pos >= 0) & (pos < self.n)
        else:
            pos = base + j
            valid = pos < self.n
        valid = valid & ok[:, None]
        if self.interpret:
            pos = jnp.where(valid, pos, self.n)
        return pos, valid

    def load_a(self, a_ref, row, chunk, block, ok):
        pos, valid = self.positions(chunk, block, ok)
        return backend.load(a_ref.at[row[:, None], pos], mask=valid, other=0.0).astype(F32)

    def coupling(self, kc_ref, row, chunk, block, ok, shift=0):
        """k at each step: k_pos ascending, k_{pos+1} (the bond to the right) descending; 0 off the ends."""
        pos, valid = self.positions(chunk, block, ok, shift)
        index = pos + (1 if self.descending else 0)
        valid = valid & (index >= 1) & (index < self.n)
        if self.coupling_rows == 0:
            return jnp.where(valid, 1.0, 0.0).astype(F32)
        krow = row if self.coupling_rows == self.batch else jnp.zeros_like(row)
        if self.interpret:
            index = jnp.where(valid, index, self.n)
        return backend.load(kc_ref.at[krow[:, None], index], mask=valid, other=0.0).astype(F32)

    def _pair_index(self, chunk, block, ok, shift=0):
        pos, valid = self.positions(chunk, block, ok, shift)
        two = jnp.arange(2, dtype=jnp.int32)[None, None, :]
        index = (2 * pos[:, :, None] + two).reshape(pos.shape[0], 2 * self.vector)
        mask = jnp.broadcast_to(valid[:, :, None], (*valid.shape, 2)).reshape(index.shape)
        return index, mask

    def load_pairs(self, ref, row, chunk, block, ok, shift=0):
        """(lanes, 2V) interleaved [re, im, re, im, ...] tile from a (B, 2N) array; 0 off the ends."""
        index, mask = self._pair_index(chunk, block, ok, shift)
        return backend.load(ref.at[row[:, None], index], mask=mask, other=0.0).astype(F32)


# ------------------------------------------------------------------------------------------ per-chunk records

def _row_block(rows, geo):
    row = backend.program_id(0) * rows + jnp.arange(rows, dtype=jnp.int32)
    row_ok = row < geo.batch
    # Rows past the end keep their out-of-bounds index: masked stores there can never alias a real element.
    return row, row_ok


def _record_columns(ref, row, row_ok, chunk, width, chunks):
    """The `width` fields of record `chunk` for a vector of rows, from a chunk-major (chunks * width, B) array:
    one coalesced (rows,) load per field (consecutive rows are adjacent in memory)."""
    ok = row_ok & (chunk < chunks)
    return [backend.load(ref.at[chunk * width + j, row], mask=ok, other=0.0) for j in range(width)]


def _store_record(ref, row, row_ok, chunk, width, chunks, fields):
    ok = row_ok & (chunk < chunks)
    for j, value in enumerate(fields):
        backend.store(ref.at[chunk * width + j, row], value, mask=ok)


# -------------------------------------------------------------------------------------------- backward kernels

def _reverse_block(geo, i):
    """Vector-block i of the backward walk through a chunk: its blocks last first."""
    return geo.chunk // geo.vector - 1 - i


def _backward_loader(g_ref, ct_ref, kc_ref, geo, row, chunk, ok):
    """Tiles of block i (backward order): g_t, upstream w_t, g_{t+1} (interleaved re/im) and k_{t+1}."""
    def load(i):
        block = _reverse_block(geo, i)
        return (geo.load_pairs(g_ref, row, chunk, block, ok), geo.load_pairs(ct_ref, row, chunk, block, ok),
                geo.load_pairs(g_ref, row, chunk, block, ok, shift=1),
                geo.coupling(kc_ref, row, chunk, block, ok, shift=1))

    return load


def _backward_terms(tiles, vector):
    """Per step (lists over the vector): g_t, w_t and A_t = conj(k_{t+1} g_{t+1}^2)."""
    g_tile, w_tile, h_tile, kap_tile = tiles
    g_cols, w_cols, h_cols, kap = (backend.columns(t) for t in (g_tile, w_tile, h_tile, kap_tile))
    a_re, a_im = [], []
    for j in range(vector):
        h_re, h_im = h_cols[2 * j], h_cols[2 * j + 1]
        a_re.append(kap[j] * (h_re * h_re - h_im * h_im))
        a_im.append(-(kap[j] * (2.0 * h_re * h_im)))
    return g_cols[0::2], g_cols[1::2], w_cols[0::2], w_cols[1::2], a_re, a_im


def _adjoint_maps_kernel(g_ref, ct_ref, *refs, geo, lanes):
    """Per chunk, the affine map lambda_{end+1} -> lambda_start = c + P lambda_{end+1} (complex P, c)."""
    kc_ref, (maps_ref,) = backend.split_leading_ref(refs, geo.coupling_rows != 0)
    row, chunk, ok = geo.lanes(lanes)

    def compute(i, tiles, state):
        _, _, w_re, w_im, a_re, a_im = _backward_terms(tiles, geo.vector)
        pr, pi, cr, ci = state
        for j in reversed(geo.order):
            cr, ci = w_re[j] + a_re[j] * cr - a_im[j] * ci, w_im[j] + a_re[j] * ci + a_im[j] * cr
            pr, pi = a_re[j] * pr - a_im[j] * pi, a_re[j] * pi + a_im[j] * pr
        return pr, pi, cr, ci

    one, zero = jnp.ones((lanes,), F32), jnp.zeros((lanes,), F32)
    load = _backward_loader(g_ref, ct_ref, kc_ref, geo, row, chunk, ok)
    state = backend.pipelined_loop(geo.chunk // geo.vector, load, compute, (one, zero, zero, zero))
    _store_record(maps_ref, row, ok, chunk, 4, geo.chunks, state)


def _adjoint_carry_kernel(maps_ref, states_ref, *, geo, rows, vb):
    """lambda entering each chunk from the right: 0 for the last chunk, c_j + P_j lambda_in(j) for chunk j-1."""
    row, row_ok = _row_block(rows, geo)
    blocks = -(-geo.chunks // vb)

    def chunk_of(i, c):
        # Blocks visited last first; chunk indices past the end are masked (their maps read as zeros, so lambda
        # stays 0 until the last real chunk).
        return (blocks - 1 - i) * vb + c

    def load(i):
        return [_record_columns(maps_ref, row, row_ok, chunk_of(i, c), 4, geo.chunks) for c in range(vb)]

    def compute(i, maps, state):
        lr, li = state
        for c in reversed(range(vb)):
            _store_record(states_ref, row, row_ok, chunk_of(i, c), 2, geo.chunks, (lr, li))
            pr, pi, cr, ci = maps[c]
            lr, li = cr + pr * lr - pi * li, ci + pr * li + pi * lr
        return lr, li

    zero = jnp.zeros((rows,), F32)
    backend.pipelined_loop(blocks, load, compute, (zero, zero))


def _adjoint_values_kernel(g_ref, ct_ref, *refs, geo, lanes):
    kc_ref, (states_ref, grad_ref) = backend.split_leading_ref(refs, geo.coupling_rows != 0)
    row, chunk, ok = geo.lanes(lanes)
    start = _record_columns(states_ref, row, ok, chunk, 2, geo.chunks)

    def compute(i, tiles, state):
        g_re, g_im, w_re, w_im, a_re, a_im = _backward_terms(tiles, geo.vector)
        lr, li = state
        grads = [None] * geo.vector
        for j in reversed(geo.order):
            lr, li = w_re[j] + a_re[j] * lr - a_im[j] * li, w_im[j] + a_re[j] * li + a_im[j] * lr
            sq_re = g_re[j] * g_re[j] - g_im[j] * g_im[j]
            sq_im = 2.0 * g_re[j] * g_im[j]
            grads[j] = -(lr * sq_re + li * sq_im)
        pos, valid = geo.positions(chunk, _reverse_block(geo, i), ok)
        backend.store(grad_ref.at[row[:, None], pos], backend.tile(grads), mask=valid)
        return lr, li

    load = _backward_loader(g_ref, ct_ref, kc_ref, geo, row, chunk, ok)
    backend.pipelined_loop(geo.chunk // geo.vector, load, compute, tuple(start))


# ------------------------------------------------------------------------------------------------------ launches

def _launch(kernel, geo, config, interpret, out_shape, name, per_row=False):
    if per_row:
        grid = (-(-geo.batch // config.carry_rows),)
        warps = config.carry_warps
    else:
        grid = (-(-geo.batch * geo.chunks // config.lanes),)
        warps = config.num_warps
    return backend.pallas_call(kernel, out_shape=out_shape, grid=grid, num_warps=warps,
                               num_stages=config.num_stages, interpret=interpret, name=name)


def _three_phases(maps_kernel, carry_kernel, values_kernel, inputs, kc, geo, config, interpret, widths, out, name):
    batch = geo.batch
    coupling = () if kc is None else (kc,)
    lane_params = dict(geo=geo, lanes=config.lanes)
    row_params = dict(geo=geo, rows=config.carry_rows, vb=config.carry_vector)
    # Per-chunk records (chunk maps, entering states) are stored chunk-major, (chunks * width, B), so that the
    # carry kernel, whose lanes are rows, reads and writes them coalesced.
    maps = _launch(functools.partial(maps_kernel, **lane_params), geo, config, interpret,
                   jax.ShapeDtypeStruct((geo.chunks * widths[0], batch), F32), f"{name}_maps")(*inputs, *coupling)
    states = _launch(functools.partial(carry_kernel, **row_params), geo, config, interpret,
                     jax.ShapeDtypeStruct((geo.chunks * widths[1], batch), F32), f"{name}_carry",
                     per_row=True)(maps)
    return _launch(functools.partial(values_kernel, **lane_params), geo, config, interpret, out,
                   f"{name}_values")(*inputs, *coupling, states)


def resolvent_grad(g, ct, kc, *, batch, n, descending, config, interpret):
    """Gradient (B, N) for `a` of the one-sided resolvent g (interleaved (B, 2N), the forward's output) under the
    cotangent `ct` (same layout); kc: (rows, N) couplings or None for unit coupling."""
    geo = _Geometry(n=n, batch=batch, chunk=config.chunk_for(n), vector=config.vector, descending=descending,
                    coupling_rows=0 if kc is None else kc.shape[0], interpret=interpret)
    out = jax.ShapeDtypeStruct((geo.batch, geo.n), F32)
    return _three_phases(_adjoint_maps_kernel, _adjoint_carry_kernel, _adjoint_values_kernel, (g, ct), kc, geo,
                         config, interpret, (4, 2), out, "bk_resolvent_grad")
