"""Sparse mixture-of-experts FFN of ResNet-BK (REFERENCE_SPEC §1.9).

Every expert is evaluated on every token and the outputs are mixed with routing weights that are zero for the
experts a token was not sent to. That is mathematically identical to dispatching (the reference has no capacity
limit and drops no tokens) and keeps shapes static for jit; it costs E× the FLOPs of a dispatching MoE, which is
fine at the sizes this model is used at.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .common import Buffer

glorot_uniform = jax.nn.initializers.glorot_uniform()
zeros = jax.nn.initializers.zeros


def _low_rank_pair(rngs: nnx.Rngs, experts: int, m: int, n: int, k: int) -> tuple[nnx.Param, nnx.Param]:
    a = jax.nn.initializers.glorot_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))(rngs.params(), (experts, m, k))
    # Var(A @ B) = k Var(A) Var(B); Glorot variances: A 2/(m+k), dense W 2/(m+n).
    b_std = ((m + k) / (k * (m + n))) ** 0.5
    b = jax.nn.initializers.normal(b_std)(rngs.params(), (experts, k, n))
    return nnx.Param(a), nnx.Param(b)


class SparseMoE(nnx.Module):
    """Top-k softmax routing over `num_experts` two-layer ReLU experts (dense routing when top_k >= E).

    With numerics="reference" the legacy scattering term is kept: it adds the same batch-normalised token-norm
    shift to every expert logit of a token, so it changes no routing decision and no softmax beyond rounding,
    and its warm-up reads `scattering_step_counter`. Native numerics drop it.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, dropout: float, *, scattering_scale: float,
                 scattering_scale_warmup_steps: int, use_scattering: bool, rngs: nnx.Rngs,
                 expert_rank: int | None = None, checkpoint_hidden: bool = False):
        hidden = 2 * d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.dropout = dropout
        self.scattering_scale = scattering_scale
        self.scattering_scale_warmup_steps = scattering_scale_warmup_steps
        self.use_scattering = use_scattering and scattering_scale > 0
        # Experts are stacked along a leading axis; glorot over the last two axes matches torch's per-expert
        # xavier_uniform_ on each (out, in) weight.
        init = jax.nn.initializers.glorot_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.expert_rank = expert_rank
        self.checkpoint_hidden = checkpoint_hidden
        if expert_rank is None:
            self.w1 = nnx.Param(init(rngs.params(), (num_experts, d_model, hidden)))
            self.w2 = nnx.Param(init(rngs.params(), (num_experts, hidden, d_model)))
        else:
            # Each expert matrix W (m x n) is A (m x k) @ B (k x n). A is Glorot; B is scaled so that A @ B has the
            # variance of a Glorot (m x n) matrix, so a low-rank expert starts where a dense one would.
            self.w1_a, self.w1_b = _low_rank_pair(rngs, num_experts, d_model, hidden, expert_rank)
            self.w2_a, self.w2_b = _low_rank_pair(rngs, num_experts, hidden, d_model, expert_rank)
        self.b1 = nnx.Param(jnp.zeros((num_experts, hidden)))
        self.b2 = nnx.Param(jnp.zeros((num_experts, d_model)))
        self.gating_network = nnx.Linear(d_model, num_experts, kernel_init=glorot_uniform, bias_init=zeros,
                                         rngs=rngs)
        # Persistent in the reference's state dict; incremented by the training step (see train.py).
        self.scattering_step_counter = Buffer(jnp.zeros((), jnp.int32))

    def routing_weights(self, x_flat: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (weights (T, E), routing entropy). Zero weight for experts a token is not routed to."""
        logits = self.gating_network(x_flat)
        if self.use_scattering:
            norms = jnp.linalg.norm(x_flat.astype(jnp.float32), axis=-1)
            normalised = (norms - norms.mean()) / (jnp.std(norms, ddof=1) + 1e-6)
            warm = self.scattering_scale_warmup_steps
            in_warmup = (warm > 0) & (self.scattering_step_counter[...] < warm)
            scale = jnp.where(in_warmup, 2.0 * self.scattering_scale, self.scattering_scale)
            logits = logits + (scale * normalised)[:, None].astype(logits.dtype)
        if self.top_k >= self.num_experts:
            weights = jax.nn.softmax(logits, axis=-1)
            probs = weights
        else:
            top_vals, top_idx = jax.lax.top_k(logits, self.top_k)
            probs = jax.nn.softmax(top_vals, axis=-1)
            one_hot = jax.nn.one_hot(top_idx, self.num_experts, dtype=probs.dtype)  # (T, k, E)
            weights = jnp.einsum("tk,tke->te", probs, one_hot)
        entropy = jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-8)), axis=-1))
        return weights, entropy

    def dense_expert_weights(self) -> dict[str, jax.Array]:
        """{"w1", "w2"} as dense (E, m, n) arrays (products of the factors for low-rank experts)."""
        if self.expert_rank is None:
            return {"w1": self.w1[...], "w2": self.w2[...]}
        return {name: jnp.einsum("emk,ekn->emn", getattr(self, f"{name}_a")[...], getattr(self, f"{name}_b")[...],
                                 precision=jax.lax.Precision.HIGHEST) for name in ("w1", "w2")}

    def _activate(self, pre: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
        hidden = jax.nn.relu(pre)
        if dropout_rng is not None and self.dropout > 0:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - self.dropout, hidden.shape)
            hidden = jnp.where(keep, hidden / (1.0 - self.dropout), 0.0).astype(hidden.dtype)
        return hidden

    def _experts(self, x_flat: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
        """Every expert's output (T, E, d) for every token.

        The widest activations are each expert's hidden layer (T, E, 2d) and output (T, E, d). With
        `checkpoint_hidden` both are recomputed in the backward pass rather than stored: for dense experts from
        the saved input (one more expert forward), for low-rank experts from the saved (T, E, k) projection x·A1
        (5/6 of an expert forward).
        """
        remat = jax.checkpoint if self.checkpoint_hidden else (lambda f: f)
        b1, b2 = self.b1[...], self.b2[...]
        if self.expert_rank is None:
            @remat
            def ffn(x, w1, b1, w2, b2, rng):
                hidden = self._activate(jnp.einsum("td,edh->teh", x, w1) + b1, rng)
                return jnp.einsum("teh,ehd->ted", hidden, w2) + b2

            return ffn(x_flat, self.w1[...], b1, self.w2[...], b2, dropout_rng)

        @remat
        def rest(u, w1_b, b1, w2_a, w2_b, b2, rng):
            hidden = self._activate(jnp.einsum("tek,ekh->teh", u, w1_b) + b1, rng)
            return jnp.einsum("tek,ekd->ted", jnp.einsum("teh,ehk->tek", hidden, w2_a), w2_b) + b2

        u = jnp.einsum("td,edk->tek", x_flat, self.w1_a[...])
        return rest(u, self.w1_b[...], b1, self.w2_a[...], self.w2_b[...], b2, dropout_rng)

    def __call__(self, x: jax.Array, *, dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        batch, length, d_model = x.shape
        x_flat = x.reshape(batch * length, d_model)
        weights, entropy = self.routing_weights(x_flat)
        expert_out = self._experts(x_flat, dropout_rng)
        y = jnp.einsum("te,ted->td", weights.astype(expert_out.dtype), expert_out)
        return y.reshape(batch, length, d_model), entropy
