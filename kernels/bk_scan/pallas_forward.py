"""BK-Core forward kernels: the one-sided resolvents and the bidirectional diagonal as Pallas (Triton) kernels.

Notation in `pallas.py`, which wraps these kernels in custom VJPs.

Lane-scan form (three launches). A program is one chunk of C = L * V positions of one row (or several, walked in
turn: `scan_chunks_per_program`); lane l owns the V consecutive positions chunk_start + l V + (0 .. V-1), so every
load and store is one contiguous (L, V) tile. Maps are 2x2 complex matrices as 8 planes (m00, m01, m10, m11; re,
im each), renormalised by powers of two: the recursions are projective, only ratios of the state are ever used.

  1. prefix:  each lane multiplies the step matrices of its V positions (once for both sweeps with unit
              coupling: `_transposed`); an in-register scan over the lanes (`backend.associative_scan`, one
              tt.scan) gives every lane's inclusive prefix, all stored (8 floats per lane and sweep); the last
              lane's is the chunk's product.
  2. carry:   one program per row and sweep scans the row's chunk products and stores the state entering every
              chunk.
  3. values:  each lane applies its neighbour's prefix (the lanes before it) to its chunk's entering state and
              runs the continued fraction(s) through its V positions writing the outputs: no cross-lane work.
              Bidirectional: the two fractions meet in the middle of the lane (two independent chains of V
              steps, not one of 2V). Outputs are stored in groups of columns as they complete.

When every chunk lies wholly inside its row (N a multiple of L * V: `_ScanGeometry.exact`), nothing is masked
and unit coupling runs with k = 1 on every step. A Python z is compiled into the prefix and values kernels.
The right sweep (x_t = d_t x_{t+1} - k_{t+1} x_{t+2}, gR_t = x_{t+1} / x_t) is the same with positions walked
downwards: reverse scans, the neighbour to the right. Positions past the end of a row (the padding of its last
chunk) come after every real position in the left sweep, where their outputs are masked; in the right sweep they
come first, and the bond past the last position has k = 0, so the step at N - 1 discards the state they produced
(as the step at 0 discards the left sweep's start state): only q != 0 is needed, and padding steps (d = 1 - i Im z,
k = 0) keep it non-zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _pallas_backend as backend
from ..tuned_block_sizes import BK_SCAN as TUNED
from .complex_planes import cdiv_scaled, cinverse, normalise, one_over

F32 = jnp.float32


def _take_z(refs, zconst):
    """(Re z, -Im z, the other refs): z compiled in when `zconst` holds it, else read from the first ref."""
    if zconst is not None:
        return zconst[0], -zconst[1], refs
    z_ref, *rest = refs
    return z_ref[0], -z_ref[1], rest


def _interleave(re_cols, im_cols):
    """(n,) planes of V steps -> (n, 2V) tile [re_0, im_0, re_1, im_1, ...]."""
    return backend.tile([x for pair in zip(re_cols, im_cols) for x in pair])


_IDENTITY = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# Steps between renormalisations of a lane's running product or state: growth is at most (|d| + |k|)^8, finite in
# float32 for |a - z| + |k| up to 1e4 (the bound the config documents).
_RENORM_EVERY = 8
_SIDES = {"left": ("left",), "right": ("right",), "both": ("left", "right")}
# Output columns per store of the values kernel, per mode: 16 = 128 contiguous bytes of interleaved (Re, Im) per
# lane. On the H100 16 beat 8 by ~1 µs for the one-sided scans and lost by ~1 µs for the bidirectional one
# (docs/perf/NOTES.md v8).
_STORE_COLUMNS = TUNED["store_columns"]
# Whether the values kernel takes its reciprocals as one SFU instruction (`backend.reciprocal`) rather than a
# division (Triton's `div.full.f32`, which adds range scaling). On the H100 the SFU form was 1 µs faster for the
# bidirectional kernel (three reciprocals a position) and 0.7 µs slower for the one-sided ones, with the same
# errors against float64 (docs/perf/NOTES.md v10).
_SFU_RECIPROCAL = TUNED["sfu_reciprocal"]


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
    return tuple(normalise(list(_compose_unnormalised(earlier, later))))


def _apply(m, p, q):
    """m (p, q)^T for planes m and complex p = (pr, pi), q = (qr, qi); the result renormalised, (pr, pi, qr, qi)."""
    m00r, m00i, m01r, m01i, m10r, m10i, m11r, m11i = m
    pr, pi, qr, qi = p[0], p[1], q[0], q[1]
    return normalise([m00r * pr - m00i * pi + m01r * qr - m01i * qi, m00r * pi + m00i * pr + m01r * qi + m01i * qr,
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
        return backend.columns(d_re), {side: [1.0] * self.vector if k is None else backend.columns(k)
                                       for side, k in kap.items()}

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
            x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i = normalise([x0r, x0i, y0r, y0i, x1r, x1i, y1r, y1i])
        n0r = d_re[j] * y0r - d_im * y0i - kap[j] * x0r
        n0i = d_re[j] * y0i + d_im * y0r - kap[j] * x0i
        n1r = d_re[j] * y1r - d_im * y1i - kap[j] * x1r
        n1i = d_re[j] * y1i + d_im * y1r - kap[j] * x1i
        x0r, x0i, y0r, y0i = y0r, y0i, n0r, n0i
        x1r, x1i, y1r, y1i = y1r, y1i, n1r, n1i
    # Columns are the images of (1, 0) and (0, 1): m00 = x0, m10 = y0, m01 = x1, m11 = y1.
    planes = normalise([x0r, x0i, x1r, x1i, y0r, y0i, y1r, y1i])
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
    kc_ref, (prefix_ref,) = backend.split_leading_ref(refs, geo.coupling_rows != 0)
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
            scanned = normalise(list(backend.associative_scan(combine, maps[side], reverse=side == "right")))
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
    state = normalise([scanned[2], scanned[3], scanned[6], scanned[7]])
    target = chunk + 1 - 2 * right
    ok = real & (target >= 0) & (target < geo.chunks)
    for f, plane in enumerate(state):
        index = geo._index(geo.state_index(row, target, 4 * s + f, len(sides)), ok, geo.state_size(len(sides)))
        backend.store(states_ref.at[index], plane, mask=ok)


def _forward_values_kernel(*refs, geo, mode, zconst):
    """Phase 3: each lane's entering state = (the neighbour lane's scan entry) applied to the chunk's entering
    state; the lane then runs the continued fraction(s) through its V positions and writes the outputs. No
    cross-lane work."""
    zr, d_im, (a_ref, *refs) = _take_z(refs, zconst)
    kc_ref, (prefix_ref, states_ref, out_ref) = backend.split_leading_ref(refs, geo.coupling_rows != 0)
    sides = _SIDES[mode]
    lane = jnp.arange(geo.lanes, dtype=jnp.int32)
    rcp = functools.partial(backend.reciprocal, interpret=geo.interpret) if _SFU_RECIPROCAL[mode] else one_over

    def reciprocal(re, im):
        """1 / D for the continued fractions' denominators D_t = d_t - k g. Unscaled for unit coupling: H is then
        Hermitian, so |g| <= 1 / |Im z| and |Im z| <= |D| <= |d| + 1 / |Im z|, far inside the range where
        re^2 + im^2 neither overflows nor underflows (|Im z| >= 1e-15, |a - z| <= 1e15). At real z a denominator
        under 1e-19 (where G itself is singular to float32 precision) gives inf instead of a huge finite value."""
        if geo.coupling_rows == 0:
            return cinverse(re, im, rcp)
        # General couplings need not keep H Hermitian (k = b c < 0), so they keep the scaled division.
        return cdiv_scaled(jnp.ones_like(re), jnp.zeros_like(im), re, im, rcp)

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
            ratio[side] = cdiv_scaled(pr, pi, qr, qi, rcp)
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


def forward(a, kc, zvec, mode, config, interpret, zconst=None):
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
