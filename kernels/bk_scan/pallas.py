"""BK-Core native resolvent scans as Pallas (Triton) GPU kernels, with exact backward kernels.

Notation as in `xla.py`: d_t = a_t - z, k_t = b_{t-1} c_{t-1} (k_0 = 0). The causal resolvent
g_t = 1/(d_t - k_t g_{t-1}) is the ratio g_t = q_t / n_t of the projective state (p, q) = (theta_{t-1}, theta_t),
which steps linearly:

    (p, q) -> (q, n),   n = d_t q - k_t p.

Complex numbers are separate real and imaginary float32 planes. The state is renormalised by an exact power of two
once per `vector` steps, so it never overflows and rounding is only that of the products; the division q / n is
done on operands scaled by a power of two, so |n|^2 cannot overflow either. Nothing is ever differentiated through
a kernel: every pallas_call sits inside a `jax.custom_vjp`.

Forward (three launches, sequential depth chunk + N/chunk + chunk instead of N):
  1. chunk maps:   one lane per (row, chunk) multiplies the chunk's 2x2 complex step matrices (renormalised), and
                   writes the product (8 floats);
  2. carries:      one lane per row applies the chunk products in order to the start state (0, 1), writing the
                   state entering every chunk (4 floats per chunk); chunk products and states are stored
                   chunk-major, (chunks * fields, B), so these row lanes load and store them coalesced;
  3. values:       one lane per (row, chunk) restarts from its entering state and steps through the chunk, writing
                   (Re g_t, Im g_t).
Reads of a and writes of G are `vector` consecutive steps per lane (32 and 64 contiguous bytes).

Backward (exact, for a only; b, c, z get zero cotangents as in `xla.py`): with upstream w_t = ct_re + i ct_im,
  lambda_t = w_t + A_t lambda_{t+1},  A_t = conj(k_{t+1} g_{t+1}^2),  grad a_t = -Re(conj(lambda_t) g_t^2),
a reverse affine recurrence, run with the same three phases (chunk affine maps, carries between chunks, values).

`descending=True` runs the same recursions over positions N-1, ..., 0 with the coupling of the bond to the right
(k_{t+1} at position t): the right continued fraction of the bidirectional resolvent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .. import _pallas_backend as backend
from .config import BkScanConfig

F32 = jnp.float32
_MAX_EXP = 126


# ------------------------------------------------------------------------------------------------ small helpers

def _exponent(magnitude):
    """e with magnitude = m 2**e, m in [0.5, 1) (clipped to keep 2**-e a normal float32); magnitude >= 0."""
    bits = lax.bitcast_convert_type(magnitude, jnp.int32)
    return jnp.clip(lax.shift_right_arithmetic(bits, 23) - 126, -_MAX_EXP, _MAX_EXP)


def _pow2(exponent):
    """2**exponent as float32, exact, for integer exponent in [-126, 127]."""
    return lax.bitcast_convert_type(lax.shift_left(exponent + 127, 23), F32)


def _normalise(planes):
    """Scale all planes by the power of two that brings the largest |entry| into [0.5, 1)."""
    largest = functools.reduce(jnp.maximum, [jnp.abs(p) for p in planes])
    scale = _pow2(-_exponent(largest))
    return [p * scale for p in planes]


def _cdiv(qr, qi, nr, ni):
    """q / n with both scaled first by the power of two that brings max(|Re n|, |Im n|) into [0.5, 1)."""
    scale = _pow2(-_exponent(jnp.maximum(jnp.abs(nr), jnp.abs(ni))))
    qr, qi, nr, ni = qr * scale, qi * scale, nr * scale, ni * scale
    inverse = 1.0 / (nr * nr + ni * ni)
    return (qr * nr + qi * ni) * inverse, (qi * nr - qr * ni) * inverse


def _columns(tile):
    """(n, W) -> W arrays (n,), W a power of two (two-way unstacks: what the Triton lowering supports)."""
    n, width = tile.shape
    if width == 1:
        return [tile.reshape(n)]
    even, odd = lax.unstack(tile.reshape(n, width // 2, 2), axis=-1)
    out = [None] * width
    out[0::2] = _columns(even)
    out[1::2] = _columns(odd)
    return out


def _tile(columns):
    """Inverse of `_columns`: W arrays (n,) -> (n, W)."""
    width = len(columns)
    n = columns[0].shape[0]
    if width == 1:
        return columns[0].reshape(n, 1)
    pair = lax.stack([_tile(columns[0::2]), _tile(columns[1::2])], axis=-1)
    return pair.reshape(n, width)


def _interleave(re_cols, im_cols):
    """(n,) planes of V steps -> (n, 2V) tile [re_0, im_0, re_1, im_1, ...]."""
    return _tile([x for pair in zip(re_cols, im_cols) for x in pair])


class _Geometry:
    """Static sizes and the position / coupling arithmetic shared by the kernels.

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

    def store_pairs(self, ref, row, chunk, block, ok, re_cols, im_cols):
        index, mask = self._pair_index(chunk, block, ok)
        backend.store(ref.at[row[:, None], index], _interleave(re_cols, im_cols), mask=mask)


def _split_refs(refs, geo, n_in_after):
    """(kc_ref or None, the rest) for kernels whose coupling input is present only for non-unit coupling."""
    if geo.coupling_rows == 0:
        return None, refs
    return refs[0], refs[1:]


_pipelined = backend.pipelined_loop


# --------------------------------------------------------------------------------------------- forward kernels

def _forward_loader(z_ref, a_ref, kc_ref, geo, row, chunk, ok):
    zr = z_ref[0]

    def load(block):
        return geo.load_a(a_ref, row, chunk, block, ok) - zr, geo.coupling(kc_ref, row, chunk, block, ok)

    return load


def _maps_kernel(z_ref, a_ref, *refs, geo, lanes):
    kc_ref, (maps_ref,) = _split_refs(refs, geo, 1)
    row, chunk, ok = geo.lanes(lanes)
    d_im = -z_ref[1]

    def compute(block, tiles, state):
        d_re, kap = (_columns(t) for t in tiles)
        x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i = state
        for j in geo.order:
            n0r = d_re[j] * y0r - d_im * y0i - kap[j] * x0r
            n0i = d_re[j] * y0i + d_im * y0r - kap[j] * x0i
            n1r = d_re[j] * y1r - d_im * y1i - kap[j] * x1r
            n1i = d_re[j] * y1i + d_im * y1r - kap[j] * x1i
            x0r, x0i, y0r, y0i = y0r, y0i, n0r, n0i
            x1r, x1i, y1r, y1i = y1r, y1i, n1r, n1i
        return tuple(_normalise([x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i]))

    one, zero = jnp.ones((lanes,), F32), jnp.zeros((lanes,), F32)
    # Columns: the images of (1, 0) and (0, 1).
    state = _pipelined(geo.chunk // geo.vector, _forward_loader(z_ref, a_ref, kc_ref, geo, row, chunk, ok),
                       compute, (one, zero, zero, zero, zero, zero, one, zero))
    _store_record(maps_ref, row, ok, chunk, 8, geo.chunks, state)


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


def _carry_kernel(maps_ref, states_ref, *, geo, rows, vb):
    row, row_ok = _row_block(rows, geo)
    blocks = -(-geo.chunks // vb)

    def load(block):
        return [_record_columns(maps_ref, row, row_ok, block * vb + c, 8, geo.chunks) for c in range(vb)]

    def compute(block, maps, state):
        pr, pi, qr, qi = state
        for c in range(vb):
            _store_record(states_ref, row, row_ok, block * vb + c, 4, geo.chunks, (pr, pi, qr, qi))
            x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i = maps[c]
            npr = x0r * pr - x0i * pi + x1r * qr - x1i * qi
            npi = x0r * pi + x0i * pr + x1r * qi + x1i * qr
            nqr = y0r * pr - y0i * pi + y1r * qr - y1i * qi
            nqi = y0r * pi + y0i * pr + y1r * qi + y1i * qr
            pr, pi, qr, qi = npr, npi, nqr, nqi
            # Map entries are <= 1 (renormalised), so the state at most doubles per chunk: renormalising every
            # second chunk keeps it in range and halves the dependent chain's length.
            if c % 2 == 1 or c == vb - 1:
                pr, pi, qr, qi = _normalise([pr, pi, qr, qi])
        return pr, pi, qr, qi

    zero, one = jnp.zeros((rows,), F32), jnp.ones((rows,), F32)
    _pipelined(blocks, load, compute, (zero, zero, one, zero))


def _values_kernel(z_ref, a_ref, *refs, geo, lanes):
    kc_ref, (states_ref, out_ref) = _split_refs(refs, geo, 2)
    row, chunk, ok = geo.lanes(lanes)
    d_im = -z_ref[1]
    start = _record_columns(states_ref, row, ok, chunk, 4, geo.chunks)

    def compute(block, tiles, state):
        d_re, kap = (_columns(t) for t in tiles)
        pr, pi, qr, qi = state
        g_re, g_im = [None] * geo.vector, [None] * geo.vector
        for j in geo.order:
            nr = d_re[j] * qr - d_im * qi - kap[j] * pr
            ni = d_re[j] * qi + d_im * qr - kap[j] * pi
            g_re[j], g_im[j] = _cdiv(qr, qi, nr, ni)
            pr, pi, qr, qi = qr, qi, nr, ni
        geo.store_pairs(out_ref, row, chunk, block, ok, g_re, g_im)
        return tuple(_normalise([pr, pi, qr, qi]))

    _pipelined(geo.chunk // geo.vector, _forward_loader(z_ref, a_ref, kc_ref, geo, row, chunk, ok), compute,
               tuple(start))


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
    g_cols, w_cols, h_cols, kap = (_columns(t) for t in (g_tile, w_tile, h_tile, kap_tile))
    a_re, a_im = [], []
    for j in range(vector):
        h_re, h_im = h_cols[2 * j], h_cols[2 * j + 1]
        a_re.append(kap[j] * (h_re * h_re - h_im * h_im))
        a_im.append(-(kap[j] * (2.0 * h_re * h_im)))
    return g_cols[0::2], g_cols[1::2], w_cols[0::2], w_cols[1::2], a_re, a_im


def _adjoint_maps_kernel(g_ref, ct_ref, *refs, geo, lanes):
    """Per chunk, the affine map lambda_{end+1} -> lambda_start = c + P lambda_{end+1} (complex P, c)."""
    kc_ref, (maps_ref,) = _split_refs(refs, geo, 1)
    row, chunk, ok = geo.lanes(lanes)

    def compute(i, tiles, state):
        _, _, w_re, w_im, a_re, a_im = _backward_terms(tiles, geo.vector)
        pr, pi, cr, ci = state
        for j in reversed(geo.order):
            cr, ci = w_re[j] + a_re[j] * cr - a_im[j] * ci, w_im[j] + a_re[j] * ci + a_im[j] * cr
            pr, pi = a_re[j] * pr - a_im[j] * pi, a_re[j] * pi + a_im[j] * pr
        return pr, pi, cr, ci

    one, zero = jnp.ones((lanes,), F32), jnp.zeros((lanes,), F32)
    state = _pipelined(geo.chunk // geo.vector, _backward_loader(g_ref, ct_ref, kc_ref, geo, row, chunk, ok),
                       compute, (one, zero, zero, zero))
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
    _pipelined(blocks, load, compute, (zero, zero))


def _adjoint_values_kernel(g_ref, ct_ref, *refs, geo, lanes):
    kc_ref, (states_ref, grad_ref) = _split_refs(refs, geo, 2)
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
        backend.store(grad_ref.at[row[:, None], pos], _tile(grads), mask=valid)
        return lr, li

    _pipelined(geo.chunk // geo.vector, _backward_loader(g_ref, ct_ref, kc_ref, geo, row, chunk, ok), compute,
               tuple(start))


# ------------------------------------------------------------------------------------------------------ launches

def _geometry(a, kc, config, descending, interpret):
    batch, n = a.shape
    coupling_rows = 0 if kc is None else kc.shape[0]
    return _Geometry(n=n, batch=batch, chunk=config.chunk_for(n), vector=config.vector, descending=descending,
                     coupling_rows=coupling_rows, interpret=interpret)


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


def _resolvent(a, kc, zvec, descending, config, interpret):
    """g as interleaved (B, 2N) float32 [Re g_0, Im g_0, Re g_1, ...]."""
    geo = _geometry(a, kc, config, descending, interpret)
    out = jax.ShapeDtypeStruct((geo.batch, 2 * geo.n), F32)
    return _three_phases(_maps_kernel, _carry_kernel, _values_kernel, (zvec, a), kc, geo, config, interpret,
                         (8, 4), out, "bk_resolvent")


def _resolvent_grad(g, ct, kc, geo, config, interpret):
    out = jax.ShapeDtypeStruct((geo.batch, geo.n), F32)
    return _three_phases(_adjoint_maps_kernel, _adjoint_carry_kernel, _adjoint_values_kernel, (g, ct), kc, geo,
                         config, interpret, (4, 2), out, "bk_resolvent_grad")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _scan(a, kc, zvec, descending, config, interpret):
    return _resolvent(a, kc, zvec, descending, config, interpret)


def _scan_fwd(a, kc, zvec, descending, config, interpret):
    g = _resolvent(a, kc, zvec, descending, config, interpret)
    return g, (g, kc, zvec, a.shape)


def _scan_bwd(descending, config, interpret, residuals, ct):
    g, kc, zvec, shape = residuals
    geo = _Geometry(n=shape[1], batch=shape[0], chunk=config.chunk_for(shape[1]), vector=config.vector,
                    descending=descending, coupling_rows=0 if kc is None else kc.shape[0], interpret=interpret)
    grad = _resolvent_grad(g, ct.astype(F32), kc, geo, config, interpret)
    return grad, None if kc is None else jnp.zeros_like(kc), jnp.zeros_like(zvec)


_scan.defvjp(_scan_fwd, _scan_bwd)


# ------------------------------------------------------------------------------------------------- public entry

def _prepare(a, b, c, z):
    """(a (B, N) f32, kc (rows, N) f32 or None for unit coupling, z as (2,) f32)."""
    a = jnp.asarray(a, F32)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"a must have shape (B, N) with N >= 1, got {a.shape}")
    batch, n = a.shape
    z = jnp.asarray(z, jnp.complex64)
    if z.ndim != 0:
        raise ValueError(f"z must be a scalar, got shape {z.shape}")
    zvec = lax.stop_gradient(jnp.stack([jnp.real(z), jnp.imag(z)]).astype(F32))
    if b is None and c is None:
        return a, None, zvec
    parts = []
    for name, x in (("b", b), ("c", c)):
        x = jnp.ones((n - 1,), F32) if x is None else jnp.asarray(x, F32)
        if x.shape not in ((n - 1,), (batch, n - 1)):
            raise ValueError(f"{name} must have shape ({n - 1},) or ({batch}, {n - 1}) for a of shape "
                             f"({batch}, {n}), got {x.shape}")
        parts.append(x if x.ndim == 2 else x[None])
    bond = lax.stop_gradient(parts[0] * parts[1])
    kc = jnp.concatenate([jnp.zeros((bond.shape[0], 1), F32), bond], axis=1)
    return a, kc, zvec


def _resolve_config(config, interpret):
    backend.require("bk_scan", interpret, alternatives="'xla', 'scan' or 'reference'")
    return BkScanConfig() if config is None else config


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def causal_features_pallas(a, b=None, c=None, z=1j, *, config: BkScanConfig | None = None,
                           interpret: bool = False):
    """Causal resolvent g_t = 1/(d_t - k_t g_{t-1}) as features (B, N, 2) float32, exact gradient for `a`."""
    config = _resolve_config(config, interpret)
    a, kc, zvec = _prepare(a, b, c, z)
    g = _scan(a, kc, zvec, False, config, bool(interpret))
    return g.reshape(a.shape[0], a.shape[1], 2)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def bidirectional_features_pallas(a, b=None, c=None, z=1j, *, config: BkScanConfig | None = None,
                                  interpret: bool = False):
    """[(H - zI)^-1]_ii = 1/(d_i - k_i gL_{i-1} - k_{i+1} gR_{i+1}) as features (B, N, 2), exact grad for `a`.

    gL and gR are the ascending and descending kernel scans (each with its backward kernels); the combination is a
    fused elementwise XLA expression, differentiated by JAX.
    """
    config = _resolve_config(config, interpret)
    a, kc, zvec = _prepare(a, b, c, z)
    batch, n = a.shape
    left = _scan(a, kc, zvec, False, config, bool(interpret)).reshape(batch, n, 2)
    right = _scan(a, kc, zvec, True, config, bool(interpret)).reshape(batch, n, 2)
    gl = lax.complex(left[..., 0], left[..., 1])
    gr = lax.complex(right[..., 0], right[..., 1])
    k = jnp.ones((1, n), F32).at[:, 0].set(0.0) if kc is None else kc
    zero = jnp.zeros((batch, 1), jnp.complex64)
    from_left = jnp.concatenate([zero, k[:, 1:] * gl[:, :-1]], axis=1)
    from_right = jnp.concatenate([k[:, 1:] * gr[:, 1:], zero], axis=1)
    z = lax.complex(zvec[0], zvec[1])
    g = 1.0 / ((a - z) - from_left - from_right)
    return jnp.stack([jnp.real(g), jnp.imag(g)], axis=-1)
