"""Adaptive-rank semiseparable layer (AR-SSM) of the Phase 1 engine (REFERENCE_SPEC §2.2).

y = T(x) + (cumsum_t(u ⊙ g) ⊙ (v ⊙ g)) W_o + b_o, with u = x U, v = x V, a per-token rank gate g = σ(MLP(x)) and
T a depthwise 3-tap convolution over time. It is a gated linear-attention form with an elementwise (per-rank)
state, not a matrix UVᵀ.

Differences from the reference, on purpose:
* The scan is an inclusive prefix sum on every device (the reference's CUDA "fused scan" is not one and has no
  gradient, §2.4 / §4 item 6); see `phase1_jax.kernels.ar_ssm_scan`.
* `local_conv="causal"` (our default for new models) shifts the 3-tap conv one step into the past so the layer is
  causal; `local_conv="centered"` reproduces the reference, which reads x[t+1] (§4 item 8).
* The rank curriculum lives in traced state (`RankState`), so changing the rank never recompiles.

Parameter names and the PyTorch mapping (Linear weights are transposed, (out, in) -> (in, out)):

    complexity_gate.0.{weight,bias}  -> complexity_gate_in.{kernel,bias}
    complexity_gate.2.{weight,bias}  -> complexity_gate_out.{kernel,bias}
    U_proj.weight / V_proj.weight    -> U_proj.kernel / V_proj.kernel
    T_conv.weight (D, 1, 3)          -> T_conv.kernel (3, D) = weight[:, 0, :].T
    output_proj.{weight,bias}        -> output_proj.{kernel,bias}
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import InvalidConfigError
from ..kernels.ar_ssm_scan import ar_ssm_scan
from .common import RankState

LOCAL_CONV_MODES = ("causal", "centered")
GATE_SPARSITY_THRESHOLD = 0.01


def xavier_uniform(gain: float = 1.0) -> Callable[..., jax.Array]:
    """torch.nn.init.xavier_uniform_ on an (in, out) kernel: U(±gain·√(6/(fan_in+fan_out)))."""
    return jax.nn.initializers.variance_scaling(gain ** 2, "fan_avg", "uniform")


class DepthwiseTimeConv(nnx.Module):
    """Depthwise 3-tap convolution over axis 1 of (B, L, D), zero padded, no bias.

    kernel (3, D). With k = kernel:
      centered: y[t] = k[0]⊙x[t−1] + k[1]⊙x[t] + k[2]⊙x[t+1]   (the reference's Conv1d(padding=1))
      causal:   y[t] = k[0]⊙x[t−2] + k[1]⊙x[t−1] + k[2]⊙x[t]   (the same taps one step later)
    From a reference Conv1d weight w of shape (D, 1, 3): kernel = w[:, 0, :].T in both modes. In causal mode an
    imported conv therefore outputs the reference's T(x) delayed by one token.
    """

    def __init__(self, features: int, mode: str, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if mode not in LOCAL_CONV_MODES:
            raise InvalidConfigError("local_conv", mode, f"must be one of {LOCAL_CONV_MODES}")
        self.mode = mode
        self.dtype = dtype
        self.kernel = nnx.Param(jax.nn.initializers.normal(0.02)(rngs.params(), (3, features), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, self.kernel[...])
        x = x.astype(dtype)
        k = self.kernel[...].astype(dtype)
        length = x.shape[1]
        pad = (1, 1) if self.mode == "centered" else (2, 0)
        xp = jnp.pad(x, ((0, 0), pad, (0, 0)))
        # Sum in tap order, like the reference's cross-correlation.
        return k[0] * xp[:, 0:length] + k[1] * xp[:, 1:length + 1] + k[2] * xp[:, 2:length + 2]


class AdaptiveRankSemiseparableLayer(nnx.Module):
    """AR-SSM layer. `__call__(x) -> (y, aux)` for x of shape (B, L, D); see the module docstring.

    aux holds scalars:
      gate_l1_loss   l1_regularization · mean|g| over all B·L·R gate entries, masked zeros included. Only
                     returned; add it to the loss yourself.
      effective_rank mean over (B, L) of Σ_R g.
      gate_sparsity  fraction of gate entries below 0.01 (masked-off ranks count as sparse).
    and, with return_gates=True, "gates" (B, L, R) after the rank mask.
    """

    def __init__(self, d_model: int, max_rank: int = 32, min_rank: int = 4, gate_hidden_dim: int | None = None,
                 l1_regularization: float = 1e-3, local_conv: str = "causal", *, rngs: nnx.Rngs,
                 scan_implementation: str | None = None, dtype: Any = None, param_dtype: Any = jnp.float32,
                 precision: jax.lax.PrecisionLike = None):
        if not isinstance(d_model, int) or d_model <= 0:
            raise InvalidConfigError("d_model", d_model, "must be a positive integer")
        if not isinstance(min_rank, int) or min_rank <= 0:
            raise InvalidConfigError("min_rank", min_rank, "must be a positive integer")
        if not isinstance(max_rank, int) or max_rank < min_rank:
            raise InvalidConfigError("max_rank", max_rank, f"must be an integer >= min_rank ({min_rank})")
        if gate_hidden_dim is None:
            gate_hidden_dim = max(d_model // 4, min_rank)
        if not isinstance(gate_hidden_dim, int) or gate_hidden_dim <= 0:
            raise InvalidConfigError("gate_hidden_dim", gate_hidden_dim, "must be a positive integer or None")
        if l1_regularization < 0:
            raise InvalidConfigError("l1_regularization", l1_regularization, "must be >= 0")
        if local_conv not in LOCAL_CONV_MODES:
            raise InvalidConfigError("local_conv", local_conv, f"must be one of {LOCAL_CONV_MODES}")

        self.d_model = d_model
        self.max_rank = max_rank
        self.min_rank = min_rank
        self.gate_hidden_dim = gate_hidden_dim
        self.l1_regularization = float(l1_regularization)
        self.local_conv = local_conv
        self.scan_implementation = scan_implementation

        dense = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.complexity_gate_in = nnx.Linear(d_model, gate_hidden_dim, kernel_init=xavier_uniform(1.0),
                                             bias_init=jax.nn.initializers.zeros, **dense)
        self.complexity_gate_out = nnx.Linear(gate_hidden_dim, max_rank, kernel_init=xavier_uniform(1.0),
                                              bias_init=jax.nn.initializers.zeros, **dense)
        self.U_proj = nnx.Linear(d_model, max_rank, use_bias=False, kernel_init=xavier_uniform(0.02), **dense)
        self.V_proj = nnx.Linear(d_model, max_rank, use_bias=False, kernel_init=xavier_uniform(0.02), **dense)
        self.T_conv = DepthwiseTimeConv(d_model, local_conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.output_proj = nnx.Linear(max_rank, d_model, kernel_init=xavier_uniform(1.0),
                                      bias_init=jax.nn.initializers.zeros, **dense)
        self.current_max_rank = RankState(jnp.asarray(max_rank, jnp.int32))

    # ----------------------------------------------------------------------------------------------- curriculum

    def rank_for_step(self, step: int, warmup_steps: int = 1000) -> int:
        """The reference's update_rank_schedule: int(min + min(1, step/warmup)·(max − min)); warmup <= 0 -> max."""
        if warmup_steps <= 0:
            return self.max_rank
        progress = min(1.0, step / warmup_steps)
        return int(self.min_rank + progress * (self.max_rank - self.min_rank))

    def set_rank(self, rank: int | jax.Array) -> None:
        """Sets the traced rank limit; gate columns >= rank are zeroed. Concrete values must be in [1, max_rank]."""
        try:
            concrete = int(rank)
        except (TypeError, jax.errors.ConcretizationTypeError):
            concrete = None  # traced inside jit: validated by the caller
        if concrete is not None and not 1 <= concrete <= self.max_rank:
            raise InvalidConfigError("rank", rank, f"must be in [1, max_rank={self.max_rank}]")
        self.current_max_rank[...] = jnp.asarray(rank, jnp.int32)

    def update_rank_schedule(self, step: int, warmup_steps: int = 1000) -> int:
        """set_rank(rank_for_step(step, warmup_steps)); returns the new rank."""
        rank = self.rank_for_step(step, warmup_steps)
        self.set_rank(rank)
        return rank

    # -------------------------------------------------------------------------------------------------- forward

    def _prepare(self, x: jax.Array):
        if jnp.iscomplexobj(x):
            warnings.warn("AdaptiveRankSemiseparableLayer got a complex input; using its real part "
                          "(as the reference does)", UserWarning, stacklevel=3)
            x = jnp.real(x)
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected x of shape (B, L, {self.d_model}), got {x.shape}")
        t_out = self.T_conv(x)
        # The three projections of x (gate MLP input, U, V) as one matmul: x is read once and one GEMM replaces
        # three narrow ones (R = 16..64 columns each), in the backward pass too. The parameters stay separate.
        gate_in = self.complexity_gate_in
        dtype = jnp.result_type(x, gate_in.kernel[...])
        fused = jnp.concatenate([gate_in.kernel[...], self.U_proj.kernel[...], self.V_proj.kernel[...]], axis=1)
        projected = jnp.matmul(x.astype(dtype), fused.astype(dtype), precision=gate_in.precision)
        hidden_dim = self.gate_hidden_dim
        xu = projected[..., hidden_dim:hidden_dim + self.max_rank]
        xv = projected[..., hidden_dim + self.max_rank:]
        hidden = jax.nn.relu(projected[..., :hidden_dim] + gate_in.bias[...].astype(dtype))
        gates = jax.nn.sigmoid(self.complexity_gate_out(hidden))
        # Mask from the traced rank: one compiled program serves every curriculum stage.
        keep = jnp.arange(self.max_rank) < self.current_max_rank[...]
        gates = jnp.where(keep, gates, jnp.zeros((), gates.dtype))
        return t_out, gates, xu, xv

    def _aux(self, gates: jax.Array, return_gates: bool) -> dict[str, jax.Array]:
        g32 = gates.astype(jnp.float32)
        aux = {
            "gate_l1_loss": self.l1_regularization * jnp.mean(jnp.abs(g32)),
            "effective_rank": jnp.mean(jnp.sum(g32, axis=-1)),
            "gate_sparsity": jnp.mean((g32 < GATE_SPARSITY_THRESHOLD).astype(jnp.float32)),
        }
        if return_gates:
            aux["gates"] = gates
        return aux

    def __call__(self, x: jax.Array, *, return_gates: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Causal (or, with local_conv="centered", reference) forward. Returns (y (B, L, D), aux)."""
        t_out, gates, xu, xv = self._prepare(x)
        ctx = ar_ssm_scan(xu, xv, gates, implementation=self.scan_implementation)
        y = t_out + self.output_proj(ctx)
        return y, self._aux(gates, return_gates)

    def bidirectional(self, x: jax.Array, *, return_gates: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(y_causal + (k_rev ⊙ v) W_o + b_o) / 2 with k_rev the inclusive suffix sum; sees the whole sequence."""
        t_out, gates, xu, xv = self._prepare(x)
        ctx = ar_ssm_scan(xu, xv, gates, implementation=self.scan_implementation)
        ctx_rev = ar_ssm_scan(xu, xv, gates, reverse=True, implementation=self.scan_implementation)
        y_causal = t_out + self.output_proj(ctx)
        y = (y_causal + self.output_proj(ctx_rev)) / 2
        return y, self._aux(gates, return_gates)
