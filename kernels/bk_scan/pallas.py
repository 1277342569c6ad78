"""BK-Core native resolvent scans as Pallas (Triton) GPU kernels, with exact backward kernels.

Notation as in `xla.py`: d_t = a_t - z, k_t = b_{t-1} c_{t-1} (k_0 = 0). The causal resolvent
g_t = 1/(d_t - k_t g_{t-1}) is the ratio g_t = q_t / n_t of the projective state (p, q) = (theta_{t-1}, theta_t),
which steps linearly:

    (p, q) -> (q, n),   n = d_t q - k_t p.

Complex numbers are separate real and imaginary float32 planes. Projective states and matrix products are
renormalised by an exact power of two (every 8 steps, or once after a lane scan of at most 64 maps), so they never
overflow and rounding is only that of the products; divisions of projective quantities are done on operands
scaled by a power of two. Nothing is ever differentiated through a kernel: every pallas_call sits inside a
`jax.custom_vjp`.

Forward (lane-scan form, three launches; see "forward kernels" below): lanes own runs of consecutive positions
inside chunks of one row; an in-register scan over the lanes (`backend.associative_scan`, one Triton `tt.scan`)
composes their 2x2 maps, a per-row scan composes the chunks, and a final pass runs every lane's continued
fraction g_t = 1/(d_t - k_t g_{t-1}) from its entering state (`_reciprocal` says why that division needs no
scaling). The bidirectional diagonal runs both continued fractions in the same three launches and writes G once.

Backward (exact, for a only; b, c, z get zero cotangents as in `xla.py`): with upstream w_t = ct_re + i ct_im,
  lambda_t = w_t + A_t lambda_{t+1},  A_t = conj(k_{t+1} g_{t+1}^2),  grad a_t = -Re(conj(lambda_t) g_t^2),
a reverse affine recurrence, run as a chunked three-phase scan (per-(row, chunk) lanes walking their chunk
sequentially: chunk affine maps, per-row carries between chunks, values; `_Geometry`).

`descending=True` runs the same recursions over positions N-1, ..., 0 with the coupling of the bond to the right
(k_{t+1} at position t): the right continued fraction of the bidirectional resolvent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
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


def _cdiv(qr, qi, nr, ni, rcp):
    """q / n with both scaled first by the power of two that brings max(|Re n|, |Im n|) into [0.5, 1); rcp(x) is
    1 / x (`backend.reciprocal`)."""
    scale = _pow2(-_exponent(jnp.maximum(jnp.abs(nr), jnp.abs(ni))))
    qr, qi, nr, ni = qr * scale, qi * scale, nr * scale, ni * scale
    inverse = rcp(nr * nr + ni * ni)
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


def _take_z(refs, zconst):
    """(Re z, -Im z, the other refs): z compiled in when `zconst` holds it, else read from the first ref."""
    if zconst is not None:
        return zconst[0], -zconst[1], refs
    z_ref, *rest = refs
    return z_ref[0], -z_ref[1], rest


def _split_refs(refs, geo):
    """(kc_ref or None, the rest) for kernels whose coupling input is present only for non-unit coupling."""
    if geo.coupling_rows == 0:
        return None, refs
    return refs[0], refs[1:]


_pipelined = backend.pipelined_loop


# --------------------------------------------------------------------------------------------- forward kernels
#
# Lane-scan form (three launches). A program is one chunk of C = L * V positions of one row (or several, walked in
# turn: `scan_chunks_per_program`); lane l owns the V
# consecutive positions chunk_start + l V + (0 .. V-1), so every load and store is one contiguous (L, V) tile.
# Maps are 2x2 complex matrices as 8 planes (m00, m01, m10, m11; re, im each), renormalised by powers of two:
# the recursions are projective, only ratios of the state are ever used.
#   1. prefix:  each lane multiplies the step matrices of its V positions (once for both sweeps with unit
#               coupling: `_transposed`); an in-register scan over the lanes (`backend.associative_scan`, one
#               tt.scan) gives every lane's inclusive prefix, all stored (8 floats per lane and sweep); the last
#               lane's is the chunk's product.
#   2. carry:   one program per row and sweep scans the row's chunk products and stores the state entering every
#               chunk.
#   3. values:  each lane applies its neighbour's prefix (the lanes before it) to its chunk's entering state and
#               runs the continued fraction(s) through its V positions writing the outputs: no cross-lane work.
#               Bidirectional: the two fractions meet in the middle of the lane (two independent chains of V
#               steps, not one of 2V). Outputs are stored in groups of columns as they complete.
# When every chunk lies wholly inside its row (N a multiple of L * V: `_ScanGeometry.exact`), nothing is masked
# and unit coupling runs with k = 1 on every step. A Python z is compiled into the prefix and values kernels.
# The right sweep (x_t = d_t x_{t+1} - k_{t+1} x_{t+2}, gR_t = x_{t+1} / x_t) is the same with positions walked
# downwards: reverse scans, the neighbour to the right. Positions past the end of a row (the padding of its last
# chunk) come after every real position in the left sweep, where their outputs are masked; in the right sweep they
# come first, and the bond past the last position has k = 0, so the step at N - 1 discards the state they produced
# (as the step at 0 discards the left sweep's start state): only q != 0 is needed, and padding steps (d = 1 - i Im z,
# k = 0) keep it non-zero.

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# Steps between renormalisations of a lane's running product or state: growth is at most (|d| + |k|)^8, finite in
# float32 for |a - z| + |k| up to 1e4 (the bound the config documents).
_RENORM_EVERY = 8
_SIDES = {"left": ("left",), "right": ("right",), "both": ("left", "right")}
# Output columns per store of the values kernel, per mode: 16 = 128 contiguous bytes of interleaved (Re, Im) per
# lane. On the H100 16 beat 8 by ~1 µs for the one-sided scans and lost by ~1 µs for the bidirectional one
# (docs/perf/NOTES.md v8).
_STORE_COLUMNS = {"left": 16, "right": 16, "both": 8}
# Whether the values kernel takes its reciprocals as one SFU instruction (`backend.reciprocal`) rather than a
# division (Triton's `div.full.f32`, which adds range scaling). On the H100 the SFU form was 1 µs faster for the
# bidirectional kernel (three reciprocals a position) and 0.7 µs slower for the one-sided ones, with the same
# errors against float64 (docs/perf/NOTES.md v10).
_SFU_RECIPROCAL = {"left": False, "right": False, "both": True}


def _compose_unnormalised(earlier, later):
    """later @ earlier for 2x2 complex matrices as 8 planes."""
    e00r, e00i, e01r, e01i, e10r, e10i, e11r, e11i = earlier
    l00r, l00i, l01r, l01i, l10r, l10i, l11r, l11i = later

    def dot(ar, ai, br, bi, cr, ci, dr, di):  # a b + c d
        return ar * br - ai * bi + cr * dr - ci * di, ar * bi + ai * br + cr * di + ci * dr

    return (*dot(l00r, l00i, e00r, e00i, l01r, l01i, e10r, e10i), *dot(l00r, l00i, e01r, e01i, l01r, l01i, e11r, e11i),
            *dot(l10r, l10i, e00r, e00i, l11r, l11i, e10r, e10i), *dot(l10r, l10i, e01r, e01i, l11r, l11i, e11r, e11i))


def _compose(earlier, later):
    """later @ earlier, renormalised (the combine of scans over many maps)."""
    return tuple(_normalise(list(_compose_unnormalised(earlier, later))))


def _apply(m, p, q):
    """m (p, q)^T for planes m and complex p = (pr, pi), q = (qr, qi); the result renormalised, (pr, pi, qr, qi)."""
    m00r, m00i, m01r, m01i, m10r, m10i, m11r, m11i = m
    pr, pi, qr, qi = p[0], p[1], q[0], q[1]
    return _normalise([m00r * pr - m00i * pi + m01r * qr - m01i * qi, m00r * pi + m00i * pr + m01r * qi + m01i * qr,
                       m10r * pr - m10i * pi + m11r * qr - m11i * qi, m10r * pi + m10i * pr + m11r * qi + m11i * qr])


class _ScanGeometry:
    """Static sizes and the index arithmetic of the forward kernels (flat (B * N,) inputs)."""

    def __init__(self, *, n, batch, lanes, vector, chunks_per_program, coupling_rows, interpret):
        self.n, self.batch, self.lanes, self.vector = n, batch, lanes, vector
        self.chunk = lanes * vector
        self.chunks = -(-n // self.chunk)
        self.records = max(2, 1 << (self.chunks - 1).bit_length())  # a power of two >= chunks for the scans
        self.per_program = min(chunks_per_program, self.chunks)
        self.groups = -(-self.chunks // self.per_program)  # programs per row
        self.coupling_rows = coupling_rows
        self.interpret = interpret
        # Every program's chunks lie wholly inside its row: no position needs a mask, and with unit coupling every
        # step can use k = 1, even at the row ends, because the boundary state (0, 1) entering a row's first step
        # (in either sweep) has p = 0, so the coupling of that step multiplies zero.
        self.exact = n % self.chunk == 0 and self.groups * self.per_program == self.chunks

    def program(self):
        """(row, first chunk) of this program; it handles chunks first .. first + per_program - 1 (those that
        exist: the positions of a chunk past the row's last are all >= n, so its loads and stores are masked)."""
        pid = backend.program_id(0)
        return pid // self.groups, (pid % self.groups) * self.per_program

    def chunk_loop(self, load, compute):
        """compute(row, chunk, load(row, chunk)) for each of the program's chunks, with the loads of the next chunk
        issued before the work on the current one (`backend.pipelined_loop`)."""
        row, first = self.program()
        if self.per_program == 1:
            compute(row, first, load(row, first))
            return

        def step(i, tiles, carry):
            compute(row, first + i, tiles)
            return carry

        backend.pipelined_loop(self.per_program, lambda i: load(row, first + i), step, jnp.int32(0))

    def block(self, chunk, first=0, width=None):
        """Positions (L, width) of columns first .. first + width - 1 of each lane's block in the chunk (all V
        columns by default), and which of them lie inside the row."""
        width = self.vector if width is None else width
        lane = jnp.arange(self.lanes, dtype=jnp.int32)
        pos = (chunk * self.chunk + lane * self.vector + first)[:, None] + jnp.arange(width, dtype=jnp.int32)[None]
        return pos, None if self.exact else pos < self.n

    def _index(self, index, valid, size):
        # The Pallas interpreter writes masked-off elements back with their old values: move them out of bounds.
        return jnp.where(valid, index, size) if self.interpret and valid is not None else index

    def load_a(self, a_ref, row, pos, valid):
        index = self._index(row * self.n + pos, valid, self.batch * self.n)
        if valid is None:
            return backend.load(a_ref.at[index]).astype(F32)
        return backend.load(a_ref.at[index], mask=valid, other=0.0).astype(F32)

    def coupling(self, kc_ref, row, bond, valid):
        """k of bond `bond` (coupling positions bond-1 and bond); 0 off the ends of the row. None for k = 1 on
        every step (unit coupling in an `exact` geometry)."""
        if self.coupling_rows == 0 and self.exact:
            return None
        ok = (bond >= 1) & (bond < self.n)
        ok = ok if valid is None else ok & valid
        if self.coupling_rows == 0:
            return jnp.where(ok, 1.0, 0.0).astype(F32)
        krow = row if self.coupling_rows == self.batch else 0
        index = self._index(krow * self.n + bond, ok, self.coupling_rows * self.n)
        return backend.load(kc_ref.at[index], mask=ok, other=0.0).astype(F32)

    def load_tiles(self, a_ref, kc_ref, row, chunk, sides):
        """The (L, V) tiles of a chunk: a once for both sweeps, and per sweep the k of its steps (k_t for the left
        sweep, k_{t+1} for the right; computed, not loaded, for unit coupling)."""
        pos, valid = self.block(chunk)
        kap = {side: self.coupling(kc_ref, row, pos + (1 if side == "right" else 0), valid) for side in sides}
        return self.load_a(a_ref, row, pos, valid), kap

    def step_terms(self, tiles, zr, chunk):
        """Per position of the lane's block, as V columns each: Re d, and the k of each sweep."""
        a, kap = tiles
        _, valid = self.block(chunk)
        # Padding steps get Re d = 1 (d = 1 - i Im z, never 0), so they keep the state's q non-zero even at z = 0.
        d_re = a - zr if valid is None else jnp.where(valid, a - zr, 1.0)
        return _columns(d_re), {side: [1.0] * self.vector if k is None else _columns(k) for side, k in kap.items()}

    # Lane scan entries, (B, chunks, 8 fields per side, L) flat: each field of a chunk is L contiguous floats.
    def prefix_index(self, row, chunk, lane, field, n_sides):
        return ((row * self.chunks + chunk) * 8 * n_sides + field) * self.lanes + lane

    def prefix_size(self, n_sides):
        return self.batch * self.chunks * 8 * n_sides * self.lanes

    # States entering each chunk, (B, chunks, 4 fields per side) flat.
    def state_index(self, row, chunk, field, n_sides):
        return (row * self.chunks + chunk) * 4 * n_sides + field

    def state_size(self, n_sides):
        return self.batch * self.chunks * 4 * n_sides

    def store_outputs(self, out_ref, row, chunk, first, re_cols, im_cols):
        """Store (Re, Im) of columns first .. first + len(re_cols) - 1 of the lanes' blocks, interleaved."""
        pos, valid = self.block(chunk, first, len(re_cols))
        two = jnp.arange(2, dtype=jnp.int32)[None, None, :]
        index = (row * 2 * self.n + 2 * pos[:, :, None] + two).reshape(self.lanes, 2 * len(re_cols))
        mask = None if valid is None else jnp.broadcast_to(valid[:, :, None], (*valid.shape, 2)).reshape(index.shape)
        backend.store(out_ref.at[self._index(index, mask, self.batch * 2 * self.n)],
                      _interleave(re_cols, im_cols), mask=mask)


def _order(side, vector):
    return range(vector) if side == "left" else range(vector - 1, -1, -1)


def _block_maps(d_re, d_im, kap, side):
    """Product of the block's step matrices [[0, 1], [-k, d]] in the side's order, per lane."""
    x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i = (jnp.full(d_re[0].shape, v, F32) for v in (1, 0, 0, 0, 0, 0, 1, 0))
    for step, j in enumerate(_order(side, len(d_re))):
        if step and step % _RENORM_EVERY == 0:
            x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i = _normalise([x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i])
        n0r = d_re[j] * y0r - d_im * y0i - kap[j] * x0r
        n0i = d_re[j] * y0i + d_im * y0r - kap[j] * x0i
        n1r = d_re[j] * y1r - d_im * y1i - kap[j] * x1r
        n1i = d_re[j] * y1i + d_im * y1r - kap[j] * x1i
        x0r, x0i, y0r, y0i = y0r, y0i, n0r, n0i
        x1r, x1i, y1r, y1i = y1r, y1i, n1r, n1i
    # Columns are the images of (1, 0) and (0, 1): m00 = x0, m10 = y0, m01 = x1, m11 = y1.
    planes = _normalise([x0r, x0i, x1r, x1i, y0r, y0i, y1r, y1i])
    return tuple(planes)


def _transposed(m):
    """J m^T J with J = diag(-1, 1): [[m00, -m10], [-m01, m11]].

    With unit coupling this turns a block's left-sweep map into its right-sweep map: the left step [[0, 1], [-k_t,
    d_t]] becomes U_t = [[0, k_t], [-1, d_t]] and the order of the product reverses, so for k_t = 1 U_t is the
    right step [[0, 1], [-k_{t+1}, d_t]]. Where the couplings differ the states differ only in ways no output
    sees: padding steps (k_t = 0) leave (0, s), s != 0, which the step at N - 1 turns into (s, d s), as the true
    steps (k_N = 0) do; the step at position 0 (k_0 = 0) only affects the product of chunk 0, which no state uses.
    """
    m00r, m00i, m01r, m01i, m10r, m10i, m11r, m11i = m
    return m00r, m00i, -m10r, -m10i, -m01r, -m01i, m11r, m11i


def _forward_prefix_kernel(*refs, geo, sides, zconst):
    """Phase 1: per lane, the inclusive scan of the lanes' block maps within the chunk (reverse for the right
    sweep), all lanes stored; the chunk's product is the entry of the lane the scan ends at."""
    zr, d_im, (a_ref, *refs) = _take_z(refs, zconst)
    kc_ref, (prefix_ref,) = _split_refs(refs, geo)
    lane = jnp.arange(geo.lanes, dtype=jnp.int32)
    # Block maps are normalised (|Re|, |Im| < 1 per entry) and a product of two grows them at most 4x, so up to
    # 64 lanes (4**63 < 3e38) the lane scan can skip the renormalisation of every combine and renormalise once.
    combine = _compose_unnormalised if geo.lanes <= 64 else _compose

    def compute(row, chunk, tiles):
        d_re, kap = geo.step_terms(tiles, zr, chunk)
        maps = {}
        for side in sides:
            if side == "right" and "left" in maps and geo.coupling_rows == 0:
                maps[side] = _transposed(maps["left"])  # one product of step matrices serves both sweeps
            else:
                maps[side] = _block_maps(d_re, d_im, kap[side], side)
        exists = jnp.full((geo.lanes,), chunk < geo.chunks)
        for s, side in enumerate(sides):
            scanned = _normalise(list(backend.associative_scan(combine, maps[side], reverse=side == "right")))
            for f, plane in enumerate(scanned):
                index = geo._index(geo.prefix_index(row, chunk, lane, 8 * s + f, len(sides)), exists,
                                   geo.prefix_size(len(sides)))
                backend.store(prefix_ref.at[index], plane, mask=exists)

    geo.chunk_loop(lambda row, chunk: geo.load_tiles(a_ref, kc_ref, row, chunk, sides), compute)


def _forward_carry_kernel(prefix_ref, states_ref, *, geo, sides):
    """Phase 2, one program per (row, sweep): scan the row's chunk products and store the state entering every
    chunk (the boundary state (0, 1) carried through the chunks before it in the sweep's order).

    The right sweep's chunks are loaded in reverse, so both sweeps run the same forward scan and one launch holds
    the two sweeps of every row side by side (before: one program per row, the sweeps one after the other)."""
    pid = backend.program_id(0)
    row, s = pid // len(sides), pid % len(sides)
    # right: 1 for the right sweep, else 0 (integer arithmetic: the Triton lowering cannot select tensors on a
    # scalar condition).
    right = s if sides == ("left", "right") else int(sides == ("right",))
    idx = jnp.arange(geo.records, dtype=jnp.int32)
    real = idx < geo.chunks
    chunk = idx + right * (geo.chunks - 1 - 2 * idx)               # the idx-th chunk in the sweep's order
    end_lane = (1 - right) * (geo.lanes - 1)                       # the lane whose scan entry is the chunk's product
    record = tuple(backend.load(prefix_ref.at[geo._index(geo.prefix_index(row, chunk, end_lane, 8 * s + f,
                                                                          len(sides)),
                                                         real, geo.prefix_size(len(sides)))],
                                mask=real, other=identity) for f, identity in enumerate(_IDENTITY))
    # Chunk products are normalised, so up to 64 of them compose without overflow (as in the lane scans).
    scanned = backend.associative_scan(_compose_unnormalised if geo.records <= 64 else _compose, record)
    # The scan through the idx-th chunk is the map entering the next one in the sweep's order; applied to the
    # boundary state (0, 1) it is the matrix's second column.
    state = _normalise([scanned[2], scanned[3], scanned[6], scanned[7]])
    target = chunk + 1 - 2 * right
    ok = real & (target >= 0) & (target < geo.chunks)
    for f, plane in enumerate(state):
        index = geo._index(geo.state_index(row, target, 4 * s + f, len(sides)), ok, geo.state_size(len(sides)))
        backend.store(states_ref.at[index], plane, mask=ok)


def _divide_one(x):
    return 1.0 / x


def _reciprocal(re, im, rcp):
    """1 / (re + i im), unscaled. Used on the continued fractions' denominators D_t = d_t - k g: for unit coupling
    H is Hermitian, so |g| <= 1 / |Im z| and |Im z| <= |D| <= |d| + 1 / |Im z|, far inside the range where
    re^2 + im^2 neither overflows nor underflows (|Im z| >= 1e-15, |a - z| <= 1e15). At real z a denominator
    under 1e-19 (where G itself is singular to float32 precision) gives inf instead of a huge finite value.
    rcp(x) is 1 / x (`backend.reciprocal`)."""
    scale = rcp(re * re + im * im)
    return re * scale, -im * scale


def _forward_values_kernel(*refs, geo, mode, zconst):
    """Phase 3: each lane's entering state = (the neighbour lane's scan entry) applied to the chunk's entering
    state; the lane then runs the continued fraction(s) through its V positions and writes the outputs. No
    cross-lane work."""
    zr, d_im, (a_ref, *refs) = _take_z(refs, zconst)
    kc_ref, (prefix_ref, states_ref, out_ref) = _split_refs(refs, geo)
    sides = _SIDES[mode]
    lane = jnp.arange(geo.lanes, dtype=jnp.int32)
    rcp = functools.partial(backend.reciprocal, interpret=geo.interpret) if _SFU_RECIPROCAL[mode] else _divide_one

    def reciprocal(re, im):
        if geo.coupling_rows == 0:
            return _reciprocal(re, im, rcp)
        # General couplings need not keep H Hermitian (k = b c < 0), so they keep the scaled division.
        return _cdiv(jnp.ones_like(re), jnp.zeros_like(im), re, im, rcp)

    def load(row, chunk):
        entering, prefix = {}, {}
        for s, side in enumerate(sides):
            first = (chunk == 0) if side == "left" else (chunk == geo.chunks - 1)
            stored = jnp.full((geo.lanes,), jnp.logical_not(first) & (chunk < geo.chunks))
            state_index = jnp.full((geo.lanes,), geo.state_index(row, chunk, 4 * s, len(sides)), jnp.int32)
            entering[side] = [backend.load(states_ref.at[geo._index(state_index + f, stored,
                                                                    geo.state_size(len(sides)))],
                                           mask=stored, other=boundary)
                              for f, boundary in enumerate((0.0, 0.0, 1.0, 0.0))]
            neighbour = lane - 1 if side == "left" else lane + 1
            has = (neighbour >= 0) & (neighbour < geo.lanes) & (chunk < geo.chunks)
            prefix[side] = [backend.load(prefix_ref.at[geo._index(geo.prefix_index(row, chunk, neighbour, 8 * s + f,
                                                                                   len(sides)),
                                                                  has, geo.prefix_size(len(sides)))],
                                         mask=has, other=identity) for f, identity in enumerate(_IDENTITY)]
        return geo.load_tiles(a_ref, kc_ref, row, chunk, sides), entering, prefix

    def compute(row, chunk, loaded):
        tiles, entering, prefix = loaded
        d_re, kap = geo.step_terms(tiles, zr, chunk)
        # The ratio g = p / q of each sweep's state entering the lane (gL_{t-1} or gR_{t+1} at its first step).
        ratio = {}
        for side in sides:
            pr, pi, qr, qi = _apply(prefix[side], entering[side][:2], entering[side][2:])
            ratio[side] = _cdiv(pr, pi, qr, qi, rcp)
        vector = geo.vector
        width = min(_STORE_COLUMNS[mode], vector)
        g_re, g_im = [None] * vector, [None] * vector

        def emit(j, value):
            # Outputs are stored a group of columns at a time, as soon as the group is complete, so that few of
            # them are live (registers) at once.
            g_re[j], g_im[j] = value
            first = j - j % width
            if all(x is not None for x in g_re[first:first + width]):
                geo.store_outputs(out_ref, row, chunk, first, g_re[first:first + width], g_im[first:first + width])

        def step(j, k, g):
            """(D, 1 / D) with D = d_j - k g: a continued fraction's denominator at column j and its next value."""
            den = (d_re[j] - k * g[0], d_im - k * g[1])
            return den, reciprocal(*den)

        if mode == "both" and vector == 1:
            gl, gr = ratio["left"], ratio["right"]
            kl, kr = kap["left"][0], kap["right"][0]
            emit(0, reciprocal(d_re[0] - kl * gl[0] - kr * gr[0], d_im - kl * gl[1] - kr * gr[1]))
        elif mode == "both":
            # G_t = 1 / (DL_t + DR_t - d_t) with DL_t = d_t - k_t gL_{t-1} = 1 / gL_t and DR_t = d_t - k_{t+1}
            # gR_{t+1} = 1 / gR_t. Meet in the middle: first the left fraction runs through the first half of the
            # lane's positions and the right one through the second (keeping their denominators); then each runs
            # on through the other half, where G_t = 1 / (DR_t - k_t gL_{t-1}) = 1 / (DL_t - k_{t+1} gR_{t+1}).
            # Two independent chains of V steps instead of one of 2V; three reciprocals a position.
            half = vector // 2
            gl, gr = ratio["left"], ratio["right"]
            dl, dr = [None] * vector, [None] * vector
            for i in range(half):
                left, right = i, vector - 1 - i
                dl[left], gl = step(left, kap["left"][left], gl)
                dr[right], gr = step(right, kap["right"][right], gr)
            for i in range(half, vector):
                left, right = i, vector - 1 - i
                kl, kr = kap["left"][left], kap["right"][right]
                emit(left, reciprocal(dr[left][0] - kl * gl[0], dr[left][1] - kl * gl[1]))
                emit(right, reciprocal(dl[right][0] - kr * gr[0], dl[right][1] - kr * gr[1]))
                _, gl = step(left, kl, gl)
                _, gr = step(right, kr, gr)
        else:
            (side,) = sides
            g = ratio[side]
            for j in _order(side, vector):
                _, g = step(j, kap[side][j], g)
                emit(j, g)

    geo.chunk_loop(load, compute)


def _forward(a, kc, zvec, mode, config, interpret, zconst=None):
    """Interleaved (B, 2N) float32 [Re g_0, Im g_0, ...]: mode "left" (causal gL), "right" (gR) or "both" (G).
    z is `zconst` (Python floats, compiled into the kernels) when given, else the (2,) array `zvec`."""
    batch, n = a.shape
    sides = _SIDES[mode]
    geo = _ScanGeometry(n=n, batch=batch, lanes=config.scan_lanes_for(n), vector=config.scan_vector_for(n),
                        chunks_per_program=config.scan_chunks_per_program,
                        coupling_rows=0 if kc is None else kc.shape[0], interpret=interpret)
    coupling = () if kc is None else (kc.reshape(-1),)

    warps = config.scan_warps_for(n)

    def launch(kernel, out_size, name, grid, warps):
        return backend.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((out_size,), F32), grid=(grid,),
                                   num_warps=warps, num_stages=config.num_stages, interpret=interpret, name=name)

    flat_a = a.reshape(-1)
    z_in = () if zconst is not None else (zvec,)
    programs = batch * geo.groups
    prefix = launch(functools.partial(_forward_prefix_kernel, geo=geo, sides=sides, zconst=zconst),
                    geo.prefix_size(len(sides)), f"bk_{mode}_prefix", programs, warps)(*z_in, flat_a, *coupling)
    states = launch(functools.partial(_forward_carry_kernel, geo=geo, sides=sides), geo.state_size(len(sides)),
                    f"bk_{mode}_carry", batch * len(sides), config.carry_warps)(prefix)
    out = launch(functools.partial(_forward_values_kernel, geo=geo, mode=mode, zconst=zconst), batch * 2 * n,
                 f"bk_{mode}_values", programs, warps)(*z_in, flat_a, *coupling, prefix, states)
    return out.reshape(batch, 2 * n)


# ------------------------------------------------------------------------------- per-chunk records (backward)

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
    g_cols, w_cols, h_cols, kap = (_columns(t) for t in (g_tile, w_tile, h_tile, kap_tile))
    a_re, a_im = [], []
    for j in range(vector):
        h_re, h_im = h_cols[2 * j], h_cols[2 * j + 1]
        a_re.append(kap[j] * (h_re * h_re - h_im * h_im))
        a_im.append(-(kap[j] * (2.0 * h_re * h_im)))
    return g_cols[0::2], g_cols[1::2], w_cols[0::2], w_cols[1::2], a_re, a_im


def _adjoint_maps_kernel(g_ref, ct_ref, *refs, geo, lanes):
    """Per chunk, the affine map lambda_{end+1} -> lambda_start = c + P lambda_{end+1} (complex P, c)."""
    kc_ref, (maps_ref,) = _split_refs(refs, geo)
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
    kc_ref, (states_ref, grad_ref) = _split_refs(refs, geo)
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


def _resolvent_grad(g, ct, kc, geo, config, interpret):
    out = jax.ShapeDtypeStruct((geo.batch, geo.n), F32)
    return _three_phases(_adjoint_maps_kernel, _adjoint_carry_kernel, _adjoint_values_kernel, (g, ct), kc, geo,
                         config, interpret, (4, 2), out, "bk_resolvent_grad")


def _zero_cotangent(x):
    return None if x is None else jnp.zeros_like(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _scan(a, kc, zvec, descending, config, interpret, zconst):
    """One-sided resolvent (causal gL, or gR when `descending`) as interleaved (B, 2N), exact VJP for `a`."""
    return _forward(a, kc, zvec, "right" if descending else "left", config, interpret, zconst)


def _scan_fwd(a, kc, zvec, descending, config, interpret, zconst):
    g = _scan(a, kc, zvec, descending, config, interpret, zconst)
    return g, (g, kc, zvec, a.shape)


def _scan_bwd(descending, config, interpret, zconst, residuals, ct):
    g, kc, zvec, shape = residuals
    geo = _Geometry(n=shape[1], batch=shape[0], chunk=config.chunk_for(shape[1]), vector=config.vector,
                    descending=descending, coupling_rows=0 if kc is None else kc.shape[0], interpret=interpret)
    grad = _resolvent_grad(g, ct.astype(F32), kc, geo, config, interpret)
    return grad, _zero_cotangent(kc), _zero_cotangent(zvec)


_scan.defvjp(_scan_fwd, _scan_bwd)


# ------------------------------------------------------------------------------------------------- public entry

def _static_z(z):
    """(Re z, Im z) as Python floats when z is a Python (or NumPy) number: compiled into the kernels, so a call
    needs no device work to build it. None for arrays and tracers (read by the kernels at run time)."""
    if z is None or isinstance(z, (bool, np.bool_)):
        raise ValueError(f"z must be a complex scalar (a number or a 0-d array), got {z!r}")
    if isinstance(z, (int, float, complex, np.number)):
        z = complex(z)
        return float(z.real), float(z.imag)
    return None


def _prepare(a, b, c, z):
    """(a (B, N) f32, kc (rows, N) f32 or None for unit coupling, z as (2,) f32; None for z = None, which the
    callers pass when z is compiled into the kernels)."""
    a = jnp.asarray(a, F32)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"a must have shape (B, N) with N >= 1, got {a.shape}")
    batch, n = a.shape
    zvec = None
    if z is not None:
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


@functools.partial(jax.jit, static_argnames=("config", "interpret", "zconst"))
def _causal_features(a, b, c, z, *, config, interpret, zconst):
    a, kc, zvec = _prepare(a, b, c, z)
    g = _scan(a, kc, zvec, False, config, interpret, zconst)
    return g.reshape(a.shape[0], a.shape[1], 2)


def causal_features_pallas(a, b=None, c=None, z=1j, *, config: BkScanConfig | None = None,
                           interpret: bool = False):
    """Causal resolvent g_t = 1/(d_t - k_t g_{t-1}) as features (B, N, 2) float32, exact gradient for `a`.

    A Python number z is compiled into the kernels (one compilation per value); an array z is read at run time."""
    zconst = _static_z(z)
    return _causal_features(a, b, c, None if zconst is not None else z, config=_resolve_config(config, interpret),
                            interpret=bool(interpret), zconst=zconst)


def _combine_sides(a, kc, z, left, right):
    """G from the one-sided resolvents (interleaved (B, 2N) each): the unfused form, differentiated by JAX."""
    batch, n = a.shape
    gl = lax.complex(left[:, 0::2], left[:, 1::2])
    gr = lax.complex(right[:, 0::2], right[:, 1::2])
    k = jnp.ones((1, n), F32).at[:, 0].set(0.0) if kc is None else kc
    zero = jnp.zeros((batch, 1), jnp.complex64)
    from_left = jnp.concatenate([zero, k[:, 1:] * gl[:, :-1]], axis=1)
    from_right = jnp.concatenate([k[:, 1:] * gr[:, 1:], zero], axis=1)
    g = 1.0 / ((a - z) - from_left - from_right)
    return jnp.stack([jnp.real(g), jnp.imag(g)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bidirectional(a, kc, zvec, config, interpret, zconst):
    """G as (B, N, 2) from the fused kernel (both sweeps in one pass, one write of G)."""
    return _forward(a, kc, zvec, "both", config, interpret, zconst).reshape(a.shape[0], a.shape[1], 2)


def _bidirectional_fwd(a, kc, zvec, config, interpret, zconst):
    return _bidirectional(a, kc, zvec, config, interpret, zconst), (a, kc, zvec)


def _bidirectional_bwd(config, interpret, zconst, residuals, ct):
    # Recompute both sides with the one-sided kernels and pull the cotangent back through the unfused combination
    # (JAX) and their backward kernels: the forward stays one pass, the gradient is exact.
    a, kc, zvec = residuals
    z = complex(*zconst) if zconst is not None else lax.complex(zvec[0], zvec[1])

    def unfused(a):
        return _combine_sides(a, kc, z, _scan(a, kc, zvec, False, config, interpret, zconst),
                              _scan(a, kc, zvec, True, config, interpret, zconst))

    grad = jax.vjp(unfused, a)[1](ct)[0]
    return grad, _zero_cotangent(kc), _zero_cotangent(zvec)


_bidirectional.defvjp(_bidirectional_fwd, _bidirectional_bwd)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "zconst"))
def _bidirectional_features(a, b, c, z, *, config, interpret, zconst):
    a, kc, zvec = _prepare(a, b, c, z)
    return _bidirectional(a, kc, zvec, config, interpret, zconst)


def bidirectional_features_pallas(a, b=None, c=None, z=1j, *, config: BkScanConfig | None = None,
                                  interpret: bool = False):
    """[(H - zI)^-1]_ii = 1/(d_i - k_i gL_{i-1} - k_{i+1} gR_{i+1}) as features (B, N, 2), exact grad for `a`.

    Forward: one fused kernel pair (both continued fractions in one pass over a, G written once). Backward: the
    one-sided kernels recompute gL and gR, whose backward kernels and the (JAX-differentiated) combination give
    the exact gradient. A Python number z is compiled into the kernels (one compilation per value); an array z is
    read at run time.
    """
    zconst = _static_z(z)
    return _bidirectional_features(a, b, c, None if zconst is not None else z, config=_resolve_config(config, interpret),
                                   interpret=bool(interpret), zconst=zconst)
