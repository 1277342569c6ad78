"""Holographic Tensor-Train (HTT) embedding: a V x D table stored as two small TT cores (REFERENCE_SPEC §2.1).

Token id t is split as t = a * v2 + b (a < v1, b < v2) and the output column as j = j1 * d2 + j2, and

    E[t, j] = sum_rho cos(phase_shift[rho]) * core1[a, 0, rho, j1] * core2[b, rho, 0, j2]      (first D columns kept)

with v1 = ceil(sqrt(V)), v2 = ceil(V / v1), d1 = ceil(sqrt(D)), d2 = ceil(D / d1). Parameter shapes, their order and
the forward arithmetic match the PyTorch reference, so its state_dicts load key for key (core1, core2, phase_shift).

Token ids: unlike the reference, which silently clamps out-of-range ids onto other tokens' rows, this module does not
repair ids. Callers validate ids on the host (the model does it before training); inside `jit` an id outside
[0, V) yields a row of NaN, so a bad batch shows up in the loss instead of training on a wrong token. The gathers
themselves use `mode="clip"` only to keep the memory access in bounds; those rows are then overwritten with NaN.
`check_finite` is a host-side helper that raises `NumericalInstabilityError` on non-finite output.

Beyond the reference: `to_dense` (exact expansion), `from_dense` (best rank-r approximation of a trained table, by
truncated SVD of the reshaped matrix; the reference's 'svd' initialisation does not approximate E, see §4.10) and
`logits_from_cores` (a tied output head that never materialises the V x D table).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import InvalidConfigError, NumericalInstabilityError
from .common import Buffer

__all__ = ["HolographicTTEmbedding", "tt_factorization"]

_HIGHEST = jax.lax.Precision.HIGHEST
# from_dense keeps |phase_shift| at most this, so cos(phase) >= 0.87 and folding 1/cos into core1 is harmless.
_MAX_FOLDED_PHASE = 0.5


def tt_factorization(vocab_size: int, d_model: int) -> tuple[int, int, int, int]:
    """(v1, v2, d1, d2) with v1 = ceil(sqrt(V)), v2 = ceil(V / v1), likewise for D (the reference's split)."""
    v1 = math.isqrt(vocab_size - 1) + 1  # exact integer ceil(sqrt(n)) for n >= 1
    d1 = math.isqrt(d_model - 1) + 1
    return v1, -(-vocab_size // v1), d1, -(-d_model // d1)


@functools.partial(jax.jit, static_argnums=(1,))
def _init_arrays(keys, dims, init_scale):
    """Initial core1, core2 and phase (N(0,1) times init_scale, init_scale and 0.1), one key each.

    The three draws are one vmapped normal over the stacked keys (each array is a prefix of its key's draw):
    a single random-number kernel to compile instead of three, which dominates the cost of building a module.
    """
    v1, v2, d1, d2, r = dims
    shapes = ((v1, 1, r, d1), (v2, r, 1, d2), (r,))
    sizes = [math.prod(shape) for shape in shapes]
    draws = jax.vmap(lambda k: jax.random.normal(k, (max(sizes),), jnp.float32))(jnp.stack(keys))
    core1, core2, phase = (draws[i, :n].reshape(shape) for i, (n, shape) in enumerate(zip(sizes, shapes)))
    return core1 * init_scale, core2 * init_scale, phase * 0.1


# The computations are pure functions jitted with static sizes: inside a jitted model they are inlined, and an
# eager call compiles once instead of once per primitive.
def _phased_core1(core1: jax.Array, phase: jax.Array | None) -> jax.Array:
    """core1 as (v1, r, d1) times cos(phase) on the rank axis. Applying it before the gather gives the same
    elementwise products, hence the same rounding, as the reference (which applies it after)."""
    c1 = core1[:, 0]
    return c1 if phase is None else c1 * jnp.cos(phase)[:, None]


def _select_rows(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[index] for a small table, as a one-hot matmul.

    The cores have a few hundred rows (v1, v2 ≈ √V), so a gather's gradient, a scatter-add of every token into
    those few rows, serialises on atomics (4x slower than the dense table's gather at V = 50k on an H200, bf16,
    docs/perf/PHASE1.md); the one-hot product's gradient is a plain matmul. Exact: each output is one row times
    1.0 plus zeros. An index outside the table gives a zero row (the caller masks those tokens).
    """
    one_hot = jax.nn.one_hot(index, table.shape[0], dtype=table.dtype)
    return jnp.matmul(one_hot, table.reshape(table.shape[0], -1), precision=_HIGHEST).reshape(
        *index.shape, *table.shape[1:])


@functools.partial(jax.jit, static_argnums=(4,))
def _lookup(core1, core2, phase, ids, dims):
    V, D, v1, v2, d1, d2 = dims
    i1 = ids // v2  # floor division and sign-of-divisor modulo, like the reference
    i2 = ids % v2
    c1 = _select_rows(_phased_core1(core1, phase), i1)  # (..., r, d1)
    c2 = _select_rows(core2[:, :, 0], i2)  # (..., r, d2)
    # Σ_r c1[r, j] c2[r, k]: an elementwise product reduced over the rank, which XLA fuses into one pass, where a
    # batch of T tiny (d1 x r)(r x d2) matmuls would be one small GEMM per token.
    f32 = jnp.float32
    out = jnp.sum(c1[..., :, :, None].astype(f32) * c2[..., :, None, :].astype(f32), axis=-3).astype(c1.dtype)
    out = out.reshape(*ids.shape, d1 * d2)[..., :D]
    valid = (ids >= 0) & (ids < V)
    return jnp.where(valid[..., None], out, jnp.asarray(jnp.nan, out.dtype))


@functools.partial(jax.jit, static_argnums=(3,))
def _dense(core1, core2, phase, dims):
    V, D, v1, v2, d1, d2 = dims
    full = jnp.einsum("arj,brk->abjk", _phased_core1(core1, phase), core2[:, :, 0], precision=_HIGHEST)
    return full.reshape(v1 * v2, d1 * d2)[:V, :D]


@functools.partial(jax.jit, static_argnums=(4,))
def _tied_logits(core1, core2, phase, h, dims):
    V, D, v1, v2, d1, d2 = dims
    batch = h.shape[:-1]
    hp = jnp.pad(h, [(0, 0)] * len(batch) + [(0, d1 * d2 - D)]).reshape(*batch, d1, d2)
    # Contract with core2 first, then core1: never forms the (v1*v2, d1*d2) table.
    t = jnp.einsum("...jk,brk->...jbr", hp, core2[:, :, 0], precision=_HIGHEST)
    logits = jnp.einsum("...jbr,arj->...ab", t, _phased_core1(core1, phase), precision=_HIGHEST)
    return logits.reshape(*batch, v1 * v2)[..., :V]


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InvalidConfigError(name, value, "must be a positive int")
    return int(value)


class HolographicTTEmbedding(nnx.Module):
    """Token embedding factorised into two TT cores with a cosine "phase" on the rank axis.

    Args:
      vocab_size, d_model: the table being represented (V, D).
      rank: TT rank r.
      num_cores: must be 2 (the only factorisation implemented, as in the reference).
      phase_encoding: if True `phase_shift` is a trained `nnx.Param` (init N(0, 0.1^2)); otherwise a `Buffer` of
        zeros, kept so that state_dicts have the same keys either way.
      init_scale: std of the cores at init (the reference's 0.02 gives outputs of std ~ sqrt(r) * 4e-4).
    """

    def __init__(self, vocab_size: int, d_model: int, rank: int = 16, num_cores: int = 2,
                 phase_encoding: bool = True, init_scale: float = 0.02, *, rngs: nnx.Rngs):
        vocab_size = _check_positive_int("vocab_size", vocab_size)
        d_model = _check_positive_int("d_model", d_model)
        rank = _check_positive_int("rank", rank)
        if isinstance(num_cores, bool) or num_cores != 2:
            raise InvalidConfigError("num_cores", num_cores, "only num_cores=2 is supported")
        if not isinstance(phase_encoding, (bool, np.bool_)):
            raise InvalidConfigError("phase_encoding", phase_encoding, "must be a bool")
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float, np.floating)) \
                or not math.isfinite(init_scale) or init_scale < 0:
            raise InvalidConfigError("init_scale", init_scale, "must be a finite number >= 0")

        self.vocab_size = vocab_size
        self.d_model = d_model
        self.rank = rank
        self.num_cores = 2
        self.phase_encoding = bool(phase_encoding)
        self.v1, self.v2, self.d1, self.d2 = tt_factorization(vocab_size, d_model)

        # Same order as the reference: core1, core2, phase_shift (one key each; a key is drawn for the phase even
        # when it is a zero buffer, so the cores do not depend on phase_encoding).
        keys = (rngs.params(), rngs.params(), rngs.params())
        core1, core2, phase = _init_arrays(keys, (self.v1, self.v2, self.d1, self.d2, rank), float(init_scale))
        self.core1 = nnx.Param(core1)
        self.core2 = nnx.Param(core2)
        self.phase_shift = nnx.Param(phase) if self.phase_encoding else Buffer(jnp.zeros_like(phase))

    # ------------------------------------------------------------------ forward
    def _dims(self) -> tuple[int, int, int, int, int, int]:
        return self.vocab_size, self.d_model, self.v1, self.v2, self.d1, self.d2

    def _phase(self) -> jax.Array | None:
        return self.phase_shift[...] if self.phase_encoding else None

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Embeddings of shape input_ids.shape + (D,). Ids outside [0, V) give NaN rows (see module docstring)."""
        ids = jnp.asarray(input_ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must have an integer dtype, got {ids.dtype}")
        return _lookup(self.core1[...], self.core2[...], self._phase(), ids, self._dims())

    def check_finite(self, embeddings: jax.Array, input_ids: jax.Array | None = None) -> None:
        """Host-side check (forces a device sync): raise NumericalInstabilityError if `embeddings` has NaN/Inf.

        Not usable inside `jit`; call it on concrete outputs (e.g. in a debugging or validation loop).
        """
        emb = np.asarray(embeddings)
        has_nan, has_inf = bool(np.isnan(emb).any()), bool(np.isinf(emb).any())
        if not (has_nan or has_inf):
            return
        finite = emb[np.isfinite(emb)]
        diagnostics: dict[str, Any] = {
            "has_nan": has_nan,
            "has_inf": has_inf,
            "max_value": float(np.abs(finite).max()) if finite.size else float("nan"),
            "core1_max": float(np.abs(np.asarray(self.core1[...])).max()),
            "core2_max": float(np.abs(np.asarray(self.core2[...])).max()),
        }
        if input_ids is not None:
            ids = np.asarray(input_ids)
            diagnostics["input_ids_min"] = int(ids.min())
            diagnostics["input_ids_max"] = int(ids.max())
            diagnostics["out_of_range_ids"] = int(((ids < 0) | (ids >= self.vocab_size)).sum())
        raise NumericalInstabilityError("HolographicTTEmbedding", diagnostics)

    # ------------------------------------------------------------------ sizes
    def parameter_counts(self) -> tuple[int, int]:
        """(standard, tt): V*D for a dense table, and r*(v1*d1 + v2*d2) (+ r when the phase is trained)."""
        tt = self.rank * (self.v1 * self.d1 + self.v2 * self.d2) + (self.rank if self.phase_encoding else 0)
        return self.vocab_size * self.d_model, tt

    def compression_ratio(self) -> float:
        """tt / standard (smaller is more compressed)."""
        standard, tt = self.parameter_counts()
        return tt / standard

    # ------------------------------------------------------------------ dense views
    def to_dense(self) -> jax.Array:
        """The (V, D) table this module represents; equals `self(jnp.arange(V))` up to rounding."""
        return _dense(self.core1[...], self.core2[...], self._phase(), self._dims())

    def logits_from_cores(self, h: jax.Array) -> jax.Array:
        """Tied output head: h @ to_dense().T, shape (..., V), contracting h with the cores directly.

        Cost per row is r*v2*(d1*d2 + v1*d1) multiply-adds instead of V*D, and no V x D table is formed.
        """
        if h.shape[-1] != self.d_model:
            raise ValueError(f"h must end in d_model={self.d_model}, got shape {h.shape}")
        return _tied_logits(self.core1[...], self.core2[...], self._phase(), h, self._dims())

    @classmethod
    def from_dense(cls, embedding: Any, rank: int, phase_encoding: bool = True, *,
                   rngs: nnx.Rngs | None = None, refine_iters: int = 0
                   ) -> tuple["HolographicTTEmbedding", dict[str, Any]]:
        """Best rank-`rank` HTT approximation of a dense (V, D) table.

        The format is exactly a rank-r matrix M of shape (v1*d1, v2*d2), M[(a,j1),(b,j2)] = E[a*v2+b, j1*d2+j2]
        (E zero-padded to (v1*v2, d1*d2)). Truncated SVD M ~ U S Vt gives the best such M (Eckart-Young); the cores
        get sqrt(S) on each side so both start on the same scale. Rank components beyond min(v1*d1, v2*d2) are zero.

        Phase folding: the forward multiplies core1 by cos(phase_shift), so core1 stores U sqrt(S) / cos(phase).
        phase_shift is not set to 0 although that would make the folding trivial: d cos/dphi = -sin(0) = 0 would
        leave the phase with an exactly zero gradient forever. It is N(0, 0.1^2) from `rngs` (or 0.1 everywhere
        when `rngs` is None), clipped to |phase| <= 0.5 so that |cos| >= 0.87 and the division loses nothing.

        Padding: when V < v1*v2 or D < d1*d2, the SVD also fits the zero padding, so the error on the real V x D
        entries is at most (usually slightly below) the SVD bound. `refine_iters` > 0 runs that many hard-impute
        rounds (padding refilled with the current approximation, SVD again), which never increases the error on
        the real entries.

        Returns (module, report) with report keys: relative_error (||E - to_dense()||_F / ||E||_F, float64, on the
        unpadded table), error_bound (sqrt(sum_{i>=r} sigma_i^2) / ||E||_F of the zero-padded M), singular_values
        (all of them, descending, of the last M factorised), rank, kept (= min(rank, v1*d1, v2*d2), components that
        can be nonzero; the rest are zero in both cores), padded (bool).
        """
        e = np.asarray(embedding, dtype=np.float64)
        if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] < 1:
            raise InvalidConfigError("embedding", getattr(embedding, "shape", None), "must be a non-empty (V, D) array")
        if not np.isfinite(e).all():
            raise InvalidConfigError("embedding", "non-finite values", "must be finite")
        rank = _check_positive_int("rank", rank)
        if isinstance(refine_iters, bool) or not isinstance(refine_iters, int) or refine_iters < 0:
            raise InvalidConfigError("refine_iters", refine_iters, "must be an int >= 0")
        V, D = e.shape
        # Only the structure is built (no random init to compile); every value is set below.
        module = nnx.eval_shape(lambda: cls(V, D, rank=rank, phase_encoding=phase_encoding, rngs=nnx.Rngs(0)))
        v1, v2, d1, d2 = module.v1, module.v2, module.d1, module.d2

        def to_matrix(table: np.ndarray) -> np.ndarray:  # (v1*v2, d1*d2) -> (v1*d1, v2*d2)
            return table.reshape(v1, v2, d1, d2).transpose(0, 2, 1, 3).reshape(v1 * d1, v2 * d2)

        def from_matrix(m: np.ndarray) -> np.ndarray:
            return m.reshape(v1, d1, v2, d2).transpose(0, 2, 1, 3).reshape(v1 * v2, d1 * d2)

        padded_table = np.zeros((v1 * v2, d1 * d2))
        padded_table[:V, :D] = e
        m = to_matrix(padded_table)
        kept = min(rank, *m.shape)
        norm = float(np.linalg.norm(e))
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        error_bound = float(np.sqrt(np.sum(s[kept:] ** 2)) / norm) if norm > 0 else 0.0
        for _ in range(refine_iters):
            approx = from_matrix((u[:, :kept] * s[:kept]) @ vt[:kept])
            approx[:V, :D] = e  # keep the real entries, refill only the padding
            u, s, vt = np.linalg.svd(to_matrix(approx), full_matrices=False)

        root = np.sqrt(s[:kept])
        left = np.zeros((v1 * d1, rank))
        right = np.zeros((rank, v2 * d2))
        left[:, :kept] = u[:, :kept] * root
        right[:kept] = root[:, None] * vt[:kept]

        phase = np.zeros((rank,))
        if module.phase_encoding:
            if rngs is None:
                phase = np.full((rank,), 0.1)
            else:
                drawn = np.asarray(jax.random.normal(rngs.params(), (rank,), jnp.float32), np.float64) * 0.1
                phase = np.clip(drawn, -_MAX_FOLDED_PHASE, _MAX_FOLDED_PHASE)
            phase = phase.astype(np.float32).astype(np.float64)  # fold the phase exactly as it will be stored
            left = left / np.cos(phase)[None, :]
        module.phase_shift.set_value(jnp.asarray(phase, jnp.float32))

        # left[(a, j1), rho] -> core1[a, 0, rho, j1]; right[rho, (b, j2)] -> core2[b, rho, 0, j2]
        core1 = left.reshape(v1, d1, rank).transpose(0, 2, 1)[:, None]
        core2 = right.reshape(rank, v2, d2).transpose(1, 0, 2)[:, :, None]
        module.core1.set_value(jnp.asarray(core1, jnp.float32))
        module.core2.set_value(jnp.asarray(core2, jnp.float32))

        # Error of the cores as stored (float32), expanded in float64 on the host.
        c1 = core1.astype(np.float32).astype(np.float64)[:, 0] * np.cos(phase)[None, :, None]
        c2 = core2.astype(np.float32).astype(np.float64)[:, :, 0]
        dense = np.einsum("arj,brk->abjk", c1, c2).reshape(v1 * v2, d1 * d2)[:V, :D]
        rel = float(np.linalg.norm(dense - e) / norm) if norm > 0 else float(np.linalg.norm(dense))
        report = {
            "relative_error": rel,
            "error_bound": error_bound,
            "singular_values": s,
            "rank": rank,
            "kept": kept,
            "padded": bool(V != v1 * v2 or D != d1 * d2),
        }
        return module, report
