"""Fused AR-SSM scan as Pallas (Triton) GPU kernels: ctx = cumsum_t(u ⊙ g) ⊙ (v ⊙ g), with its backward.

Shapes (B, L, R); the scan runs along L (inclusive prefix sums, or suffix sums when `reverse`). One pass over the
sequence reads u, v and g once and writes ctx once: the products, the scan and the epilogue multiply are fused.

Programs and numerics (see `config.py`): a program owns (batch row b, segment s, block of rank columns) and walks
its segment tile by tile (block_t steps x block_r columns), loading tile i + 1 while it computes tile i. Inside a
tile, a float32 inclusive cumsum; between tiles, a Kahan-compensated float32 carry; between segments (only when the
shape needs more programs than B * R / block_r), the sum of the preceding segments' totals, computed by a light
first pass and read by each program in one masked load. Accumulation is float32
whatever the input dtype (bf16 accepted); outputs take the input dtype.

Backward, with a = u ⊙ g, w = v ⊙ g, c = dctx (the scan direction D is the forward's):

    k_t  = Σ_{s ≤_D t} a_s,   da_t = Σ_{s ≥_D t} c_s w_s
    du = da ⊙ g,   dv = c ⊙ k ⊙ g,   dg = da ⊙ u + c ⊙ k ⊙ v

One kernel pass in the direction opposite to D computes da as a true running sum and k as
k_t = kend_seg − Σ_{s >_D t, s in segment} a_s, where kend_seg (k at the far end of the segment, one number per
(b, segment, column)) is a by-product of the forward kernel saved as a residual. So forward + backward read u, v, g
twice and dctx once and write ctx, du, dv, dg once: 11 array passes, the minimum for this op without storing k.
The price of recomputing k by subtraction is an absolute error of a few float32 ulps of max|k| in the gradient
(no growth with L), instead of ulps of each k_t.

Every pallas_call sits inside `jax.custom_vjp`; nothing differentiates a kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _pallas_backend as backend
from .config import ArSsmScanConfig, default_config, layout

F32 = jnp.float32


def _kahan_add(total, comp, x):
    """Compensated total += x; the represented sum is total - comp."""
    y = x - comp
    t = total + y
    comp = (t - total) - y
    return t, comp


def _tile_rows(segment, step, *, seg_len, block_t, descending):
    """Time indices of tile `step` of a segment; descending tiles start at the segment's last step."""
    j = jnp.arange(block_t, dtype=jnp.int32)
    offset = step * block_t + j
    if descending:
        return segment * seg_len + (seg_len - 1) - offset
    return segment * seg_len + offset


def _tile(b, rows, cols, length, col_mask):
    mask = (rows < length)[:, None] & col_mask[None, :]
    return (b, rows[:, None], cols[None, :]), mask


def _load_raw(ref, index, mask):
    return backend.load(ref.at[index], mask=mask, other=0.0)


def _program_coords(block_r, rank):
    b = backend.program_id(0)
    s = backend.program_id(1)
    r = backend.program_id(2)
    cols = r * block_r + jnp.arange(block_r, dtype=jnp.int32)
    return b, s, cols, cols < rank


def _tile_loader(refs, b, s, cols, col_mask, *, length, block_t, seg_len, descending):
    """load(i) -> the raw tiles of `refs` at tile i of the segment (masked-off elements are 0)."""
    def load(i):
        rows = _tile_rows(s, i, seg_len=seg_len, block_t=block_t, descending=descending)
        index, mask = _tile(b, rows, cols, length, col_mask)
        return tuple(_load_raw(ref, index, mask) for ref in refs)

    return load


def _tile_index(s, i, b, cols, col_mask, *, length, block_t, seg_len, descending):
    rows = _tile_rows(s, i, seg_len=seg_len, block_t=block_t, descending=descending)
    return _tile(b, rows, cols, length, col_mask)


def _segment_carry(totals_ref, b, s, cols, col_mask, *, num_segments, before):
    """Σ of the segment totals strictly before (or after) segment s, one masked (S, block_r) load and a sum."""
    width = 1 << max(0, (num_segments - 1).bit_length())
    seg = jnp.arange(width, dtype=jnp.int32)
    keep = (seg < s) if before else ((seg > s) & (seg < num_segments))
    mask = keep[:, None] & col_mask[None, :]
    seg = jnp.where(keep, seg, num_segments)
    tile = backend.load(totals_ref.at[b, seg[:, None], cols[None, :]], mask=mask, other=0.0).astype(F32)
    return jnp.sum(tile, axis=0)


# ------------------------------------------------------------------------------------------------------- kernels

def _segment_sum_kernel(*refs, n_factors, length, rank, block_t, block_r, seg_len):
    """out[b, s, cols] = Σ over the segment of Π factors (compensated float32)."""
    factors, out_ref = refs[:n_factors], refs[n_factors]
    b, s, cols, col_mask = _program_coords(block_r, rank)

    def compute(i, tiles, state):
        prod = tiles[0].astype(F32)
        for tile in tiles[1:]:
            prod = prod * tile.astype(F32)
        return _kahan_add(*state, jnp.sum(prod, axis=0))

    zero = jnp.zeros((block_r,), F32)
    load = _tile_loader(factors, b, s, cols, col_mask, length=length, block_t=block_t, seg_len=seg_len,
                        descending=False)
    total, comp = backend.pipelined_loop(seg_len // block_t, load, compute, (zero, zero))
    backend.store(out_ref.at[b, s, cols], total - comp, mask=col_mask)


def _forward_kernel(*refs, length, rank, block_t, block_r, seg_len, num_segments, descending):
    totals_ref, (u_ref, v_ref, g_ref, out_ref, kend_ref) = backend.split_leading_ref(refs, num_segments > 1)
    b, s, cols, col_mask = _program_coords(block_r, rank)
    geometry = dict(length=length, block_t=block_t, seg_len=seg_len, descending=descending)
    if totals_ref is None:
        carry = jnp.zeros((block_r,), F32)
    else:
        carry = _segment_carry(totals_ref, b, s, cols, col_mask, num_segments=num_segments, before=not descending)

    def compute(i, tiles, state):
        total, comp = state
        u, v, g = (t.astype(F32) for t in tiles)
        a = u * g
        k = jnp.cumsum(a, axis=0) + (total - comp)[None, :]
        index, mask = _tile_index(s, i, b, cols, col_mask, **geometry)
        backend.store(out_ref.at[index], k * (v * g), mask=mask)
        return _kahan_add(total, comp, jnp.sum(a, axis=0))

    load = _tile_loader((u_ref, v_ref, g_ref), b, s, cols, col_mask, **geometry)
    total, comp = backend.pipelined_loop(seg_len // block_t, load, compute, (carry, jnp.zeros((block_r,), F32)))
    backend.store(kend_ref.at[b, s, cols], total - comp, mask=col_mask)


def _backward_kernel(*refs, length, rank, block_t, block_r, seg_len, num_segments, descending):
    """`descending` is the direction of this pass: the opposite of the forward scan's."""
    if num_segments > 1:
        kend_ref, totals_ref, u_ref, v_ref, g_ref, c_ref, du_ref, dv_ref, dg_ref = refs
    else:
        (kend_ref, u_ref, v_ref, g_ref, c_ref, du_ref, dv_ref, dg_ref), totals_ref = refs, None
    b, s, cols, col_mask = _program_coords(block_r, rank)
    geometry = dict(length=length, block_t=block_t, seg_len=seg_len, descending=descending)
    kend = backend.load(kend_ref.at[b, s, cols], mask=col_mask, other=0.0).astype(F32)
    zero = jnp.zeros((block_r,), F32)
    if totals_ref is None:
        dcarry = zero
    else:
        # da at the segment's forward-far end starts with every dk after the segment in the forward direction
        # (segments s' > s for a causal scan: before=False when this pass descends).
        dcarry = _segment_carry(totals_ref, b, s, cols, col_mask, num_segments=num_segments,
                                before=not descending)

    def compute(i, tiles, state):
        sa, sa_comp, sd, sd_comp = state
        u, v, g, c = (t.astype(F32) for t in tiles)
        a = u * g
        dk = c * (v * g)
        # Σ of a over the steps of this segment after t in the forward direction (processed before t here).
        after = jnp.cumsum(a, axis=0) - a + (sa - sa_comp)[None, :]
        ck = c * (kend[None, :] - after)
        da = jnp.cumsum(dk, axis=0) + (sd - sd_comp)[None, :]
        index, mask = _tile_index(s, i, b, cols, col_mask, **geometry)
        backend.store(du_ref.at[index], da * g, mask=mask)
        backend.store(dv_ref.at[index], ck * g, mask=mask)
        backend.store(dg_ref.at[index], da * u + ck * v, mask=mask)
        sa, sa_comp = _kahan_add(sa, sa_comp, jnp.sum(a, axis=0))
        sd, sd_comp = _kahan_add(sd, sd_comp, jnp.sum(dk, axis=0))
        return sa, sa_comp, sd, sd_comp

    load = _tile_loader((u_ref, v_ref, g_ref, c_ref), b, s, cols, col_mask, **geometry)
    backend.pipelined_loop(seg_len // block_t, load, compute, (zero, zero, dcarry, zero))


# ------------------------------------------------------------------------------------------------------ launches

def _static(config, shape, interpret, num_warps=None):
    batch, length, rank = shape
    lay = layout(config, batch, length, rank)
    grid = (batch, lay.num_segments, lay.num_col_blocks)
    params = dict(length=length, rank=rank, block_t=config.block_t, block_r=config.block_r, seg_len=lay.seg_len)
    call = functools.partial(backend.pallas_call, grid=grid, num_warps=num_warps or config.num_warps,
                             num_stages=config.num_stages, interpret=interpret)
    return lay, params, call


def _segment_sums(factors, config, interpret):
    batch, _, rank = factors[0].shape
    lay, params, call = _static(config, factors[0].shape, interpret)
    kernel = functools.partial(_segment_sum_kernel, n_factors=len(factors), **params)
    out = jax.ShapeDtypeStruct((batch, lay.num_segments, rank), F32)
    return call(kernel, out_shape=out, name="ar_ssm_segment_sums")(*factors)


def _forward(u, v, g, reverse, config, interpret):
    batch, _, rank = u.shape
    lay, params, call = _static(config, u.shape, interpret)
    totals = (_segment_sums((u, g), config, interpret),) if lay.num_segments > 1 else ()
    kernel = functools.partial(_forward_kernel, descending=reverse, num_segments=lay.num_segments, **params)
    out_shape = (jax.ShapeDtypeStruct(u.shape, u.dtype),
                 jax.ShapeDtypeStruct((batch, lay.num_segments, rank), F32))
    return call(kernel, out_shape=out_shape, name="ar_ssm_scan_fwd")(*totals, u, v, g)


def _backward(u, v, g, kend, ct, reverse, config, interpret):
    lay, params, call = _static(config, u.shape, interpret, num_warps=config.backward_warps)
    totals = (_segment_sums((ct, v, g), config, interpret),) if lay.num_segments > 1 else ()
    kernel = functools.partial(_backward_kernel, descending=not reverse, num_segments=lay.num_segments, **params)
    out_shape = tuple(jax.ShapeDtypeStruct(u.shape, x.dtype) for x in (u, v, g))
    return call(kernel, out_shape=out_shape, name="ar_ssm_scan_bwd")(kend, *totals, u, v, g, ct)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _scan(u, v, g, reverse, config, interpret):
    return _forward(u, v, g, reverse, config, interpret)[0]


def _scan_fwd(u, v, g, reverse, config, interpret):
    out, kend = _forward(u, v, g, reverse, config, interpret)
    return out, (u, v, g, kend)


def _scan_bwd(reverse, config, interpret, residuals, ct):
    u, v, g, kend = residuals
    return _backward(u, v, g, kend, ct, reverse, config, interpret)


_scan.defvjp(_scan_fwd, _scan_bwd)


SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supports(u, v, g) -> tuple[bool, str]:
    """Whether the kernel takes these inputs (the dispatcher's default falls back to XLA otherwise)."""
    dtype = jnp.result_type(u, v, g)
    if dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {dtype} (the kernel takes float32, bfloat16 or float16)"
    if jnp.ndim(u) != 3 or jnp.shape(u)[1] < 1 or jnp.shape(u)[2] < 1:
        return False, f"shape {jnp.shape(u)}"
    return True, ""


def ar_ssm_scan_pallas(u: jax.Array, v: jax.Array, g: jax.Array, *, reverse: bool = False,
                       config: ArSsmScanConfig | None = None, interpret: bool = False) -> jax.Array:
    """cumsum_t(u ⊙ g) ⊙ (v ⊙ g) along axis 1 of (B, L, R) arrays with the Pallas kernels (see module docstring).

    interpret=True runs the kernels in the Pallas interpreter (any backend; for tests). Raises
    PallasUnavailableError when compiled kernels are asked for where they cannot run.
    """
    backend.require("ar_ssm_scan", interpret)
    ok, why = supports(u, v, g)
    if not ok:
        raise TypeError(f"ar_ssm_scan_pallas does not take these inputs: {why}")
    dtype = jnp.result_type(u, v, g)
    u, v, g = (jnp.asarray(x, dtype) for x in (u, v, g))
    if config is None:
        config = default_config(*u.shape)
    return _scan(u, v, g, bool(reverse), config, bool(interpret))
