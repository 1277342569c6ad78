"""The ResNet-BK language model (REFERENCE_SPEC §1) and its Phase 1 variant, in Flax NNX.

    ids -> token embedding (+ position embedding)
        -> n_layers x ResNetBKBlock:
               [Phase 1] h += AR-SSM(LayerNorm(h))           (only in the configured blocks)
               x = LayerNorm(h);  h += MoE(x) + bk_scale * output_proj(clip(BKCore(v_proj(x))))
        -> final LayerNorm -> LM head

Attribute names follow the PyTorch state dict (token_embedding, blocks.{i}.bk_layer.moe_ffn, ...), so the
converter's key map reads like the reference's module tree.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import ModelConfig
from ..errors import InputValidationError
from ..kernels.bk_scan import bk_features
from .ar_ssm import AdaptiveRankSemiseparableLayer
from .common import Buffer
from .htt import HolographicTTEmbedding
from .lns import LNSLinear
from .moe import SparseMoE

V_MAX = 3.0  # MoEResNetBKLayer.v_max: the potential is clamped to [-3, 3]
FEATURE_CLAMP = 10.0  # MoEResNetBKLayer.feature_clamp

glorot_uniform = jax.nn.initializers.glorot_uniform()
zeros = jax.nn.initializers.zeros


def clamp_like_torch(x: jax.Array, lo: float, hi: float) -> jax.Array:
    """torch.clamp, including its gradient: 1 wherever lo <= x <= hi, boundaries included.

    jnp.clip would give 0.5 at exact ties, which breaks bit-parity of gradients with the reference.
    """
    return jnp.where((x >= lo) & (x <= hi), x, jnp.clip(x, lo, hi))


def reference_matmul_precision(method):
    """Float32 matmuls at full precision in reference numerics, whatever the global default.

    The reference's PyTorch multiplies float32 in float32 (TF32 is off by default); XLA's default on GPUs is
    TF32, which makes training drift from the reference. Native models keep the default (and its speed).
    """
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.config.numerics != "reference":
            return method(self, *args, **kwargs)
        with jax.default_matmul_precision("highest"):
            return method(self, *args, **kwargs)

    return wrapper


def primes_below(n: int) -> list[int]:
    sieve = np.ones(max(n, 2), dtype=bool)
    sieve[:2] = False
    for p in range(2, int(n ** 0.5) + 1):
        if sieve[p]:
            sieve[p * p::p] = False
    return [int(p) for p in np.flatnonzero(sieve[:n])]


def expert_rank(config: ModelConfig) -> int | None:
    """The rank of low-rank experts (Phase 1 `expert_rank_ratio` times d_model), or None for dense experts."""
    ratio = config.phase1.expert_rank_ratio if config.phase1 is not None else None
    return None if ratio is None else max(1, round(ratio * config.d_model))


class TiedHTTHead(nnx.Module):
    """LM head tied to the HTT token embedding: logits = h · Eᵀ + bias, contracted with the TT cores, so no V x D
    matrix is formed or stored (`HolographicTTEmbedding.logits_from_cores`). Its only parameter is the bias."""

    def __init__(self, vocab_size: int):
        self.bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))

    def __call__(self, h: jax.Array, embedding: HolographicTTEmbedding) -> jax.Array:
        return embedding.logits_from_cores(h) + self.bias[...].astype(h.dtype)


class MoEResNetBKLayer(nnx.Module):
    """MoE FFN plus the BK-Core spectral branch: out = MoE(x) + bk_scale * output_proj(clip(G features))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, n = config.d_model, config.n_seq
        self.numerics = config.numerics
        self.bk_direction = config.bk_direction
        self.bk_scale = nnx.Param(jnp.ones((), jnp.float32))
        # Buffers of the reference, kept so that imported checkpoints round-trip; the forward reads them.
        self.h0_diag_base = Buffer(jnp.full((1, n), -2.0, jnp.float32))
        self.h0_sub_base = Buffer(jnp.ones((1, n - 1), jnp.float32))
        self.h0_super_base = Buffer(jnp.ones((1, n - 1), jnp.float32))
        self.z = Buffer(jnp.asarray(1j, jnp.complex64))
        self.moe_ffn = SparseMoE(d, config.num_experts, config.top_k, config.dropout,
                                 scattering_scale=config.scattering_scale,
                                 scattering_scale_warmup_steps=config.scattering_scale_warmup_steps,
                                 use_scattering=config.numerics == "reference", rngs=rngs,
                                 expert_rank=expert_rank(config),
                                 checkpoint_hidden=config.phase1 is not None and config.phase1.checkpoint_expert_hidden)
        self.v_proj = nnx.Linear(d, 1, kernel_init=glorot_uniform, bias_init=zeros, rngs=rngs)
        self.output_proj = nnx.Linear(2, d, kernel_init=glorot_uniform, bias_init=zeros, rngs=rngs)

    def bk_features(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (features (B, L, 2) float32 = [Re G_ii, Im G_ii], potential v (B, L))."""
        length = x.shape[1]
        # BK-Core always runs in float32 whatever the compute dtype: G is a ratio of long recurrences.
        v = clamp_like_torch(self.v_proj(x)[..., 0].astype(jnp.float32), -V_MAX, V_MAX)
        diag = self.h0_diag_base[...][0, :length] + v
        sup = self.h0_super_base[...][0, :length - 1]
        sub = self.h0_sub_base[...][0, :length - 1]
        feats = bk_features(diag, sup, sub, self.z[...], numerics=self.numerics, direction=self.bk_direction)
        return feats, v

    def __call__(self, x: jax.Array, *, dropout_rng: jax.Array | None = None):
        with jax.named_scope("bk_core"):
            feats, v = self.bk_features(x)
        with jax.named_scope("moe"):
            y_ffn, entropy = self.moe_ffn(x, dropout_rng=dropout_rng)
        # |G| <= 1 for z = i, so this clamp never binds; kept for imported checkpoints with other buffers.
        clamped = clamp_like_torch(feats, -FEATURE_CLAMP, FEATURE_CLAMP).astype(x.dtype)
        out = y_ffn + self.bk_scale[...].astype(x.dtype) * self.output_proj(clamped)
        return out, {"bk_features": feats, "potential": v, "routing_entropy": entropy}


class ResNetBKBlock(nnx.Module):
    def __init__(self, config: ModelConfig, *, with_ar_ssm: bool, rngs: nnx.Rngs):
        d = config.d_model
        if with_ar_ssm:
            p1 = config.phase1
            self.ar_ssm_norm = nnx.LayerNorm(d, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
            self.ar_ssm = AdaptiveRankSemiseparableLayer(
                d, max_rank=p1.ar_ssm_max_rank, min_rank=p1.ar_ssm_min_rank,
                gate_hidden_dim=p1.ar_ssm_gate_hidden_dim, l1_regularization=p1.ar_ssm_l1_regularization,
                local_conv=p1.ar_ssm_local_conv, rngs=rngs)
        else:
            self.ar_ssm = None
        self.bidirectional = config.bk_direction == "bidirectional"
        self.layer_norm = nnx.LayerNorm(d, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.bk_layer = MoEResNetBKLayer(config, rngs=rngs)

    def __call__(self, h: jax.Array, *, dropout_rng: jax.Array | None = None):
        aux: dict[str, Any] = {}
        if self.ar_ssm is not None:
            # An encoder (bidirectional BK-Core) mixes in both directions; a causal LM only looks back.
            mix = self.ar_ssm.bidirectional if self.bidirectional else self.ar_ssm
            with jax.named_scope("ar_ssm"):
                mixed, ar_aux = mix(self.ar_ssm_norm(h))
                h = h + mixed.astype(h.dtype)
            aux.update({f"ar_ssm_{k}": val for k, val in ar_aux.items()})
        out, bk_aux = self.bk_layer(self.layer_norm(h), dropout_rng=dropout_rng)
        aux.update(bk_aux)
        return h + out, aux


class ResNetBK(nnx.Module):
    """ResNet-BK language model; with `config.phase1` set, the Phase 1 model (HTT embedding, AR-SSM mixers).

    `__call__(ids)` returns logits (B, L, V). `forward(ids)` returns (logits, aux) where aux holds the
    auxiliary loss to add to the training objective (`aux_loss`, e.g. the AR-SSM gate L1 term) and per-block
    diagnostics (`bk_features`, `potential`, `routing_entropy`, AR-SSM gate statistics).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.d_model
        p1 = config.phase1
        embed_init = jax.nn.initializers.normal(config.prime_bump_scale)  # the reference uses this std always
        if p1 is not None and p1.htt_enabled:
            self.token_embedding = HolographicTTEmbedding(config.vocab_size, d, rank=p1.htt_rank,
                                                          num_cores=p1.htt_num_cores,
                                                          phase_encoding=p1.htt_phase_encoding, rngs=rngs)
        else:
            self.token_embedding = nnx.Embed(config.vocab_size, d, embedding_init=embed_init, rngs=rngs)
        if p1 is not None and p1.htt_enabled and p1.htt_position_embedding:
            self.position_embedding = HolographicTTEmbedding(config.n_seq, d, rank=p1.htt_rank,
                                                             num_cores=p1.htt_num_cores,
                                                             phase_encoding=p1.htt_phase_encoding, rngs=rngs)
        else:
            self.position_embedding = nnx.Embed(config.n_seq, d, embedding_init=embed_init, rngs=rngs)
            if config.prime_bump_init:
                table = self.position_embedding.embedding[...]
                rows = jnp.asarray(primes_below(config.n_seq), jnp.int32)
                self.position_embedding.embedding[...] = table.at[rows].add(config.prime_bump_scale)
        ar_layers = self.ar_ssm_layer_indices(config)
        self.blocks = nnx.List([ResNetBKBlock(config, with_ar_ssm=i in ar_layers, rngs=rngs)
                                for i in range(config.n_layers)])
        self.layer_norm_final = nnx.LayerNorm(d, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        if p1 is not None and p1.lm_head == "htt_tied":
            self.lm_head = TiedHTTHead(config.vocab_size)
        else:
            self.lm_head = nnx.Linear(d, config.vocab_size, kernel_init=glorot_uniform, bias_init=zeros, rngs=rngs)
        if p1 is not None and p1.lns_enabled:
            # LNS replaces the largest dense layer, the LM head; same kernel/bias layout, so checkpoints match.
            self.lm_head = LNSLinear.from_linear(self.lm_head, algorithm=p1.lns_algorithm)
        self.gradient_checkpointing = p1 is not None and p1.use_gradient_checkpointing
        if config.param_dtype != "float32":
            # Parameters and float buffers are stored in this dtype (e.g. an imported bf16 checkpoint); compute
            # follows JAX's promotion rules, and BK-Core always runs in float32.
            floats = nnx.state(self, (nnx.Param, Buffer))
            nnx.update(self, jax.tree_util.tree_map(
                lambda x: x.astype(config.param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, floats))

    @staticmethod
    def ar_ssm_layer_indices(config: ModelConfig) -> frozenset[int]:
        p1 = config.phase1
        if p1 is None or not p1.ar_ssm_enabled:
            return frozenset()
        if p1.ar_ssm_layers is None:
            return frozenset(range(config.n_layers))
        bad = [i for i in p1.ar_ssm_layers if not 0 <= i < config.n_layers]
        if bad:
            raise InputValidationError(f"model.phase1.ar_ssm_layers = {list(p1.ar_ssm_layers)} names block(s) "
                                       f"{bad}, but the model has blocks 0..{config.n_layers - 1}")
        return frozenset(p1.ar_ssm_layers)

    def check_input_shape(self, ids: jax.Array) -> None:
        """Static checks (no host sync): rank 2, integer ids, and the length rule of the numerics mode."""
        cfg = self.config
        if ids.ndim != 2:
            raise InputValidationError(f"token ids must have shape (batch, length); got shape {tuple(ids.shape)}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise InputValidationError(f"token ids must be integers; got dtype {ids.dtype}")
        length = ids.shape[1]
        if cfg.numerics == "reference" and length != cfg.n_seq:
            raise InputValidationError(
                f"numerics 'reference' needs sequences of exactly n_seq = {cfg.n_seq} tokens (as the PyTorch "
                f"reference asserts); got length {length}")
        if not 1 <= length <= cfg.n_seq:
            raise InputValidationError(f"sequence length must be between 1 and n_seq = {cfg.n_seq}; got {length}")

    @reference_matmul_precision
    def hidden_states(self, ids: jax.Array, *, dropout_rng: jax.Array | None = None,
                      compute_dtype: Any = jnp.float32,
                      remat: bool | None = None) -> tuple[jax.Array, dict[str, Any]]:
        """The final LayerNorm's output (B, L, D) in compute_dtype, and the aux dict of `forward`.

        remat: recompute each block in the backward pass (None: the config's `use_gradient_checkpointing`)."""
        self.check_input_shape(ids)
        length = ids.shape[1]
        positions = jnp.arange(length)
        with jax.named_scope("embedding"):
            h = self.token_embedding(ids) + self.position_embedding(positions[None, :])
            h = h.astype(compute_dtype)
        block_rngs = (jax.random.split(dropout_rng, len(self.blocks)) if dropout_rng is not None
                      else [None] * len(self.blocks))
        per_block = []
        remat = self.gradient_checkpointing if remat is None else remat
        for block, rng in zip(self.blocks, block_rngs):
            if remat:
                # Recompute each block's activations in the backward pass instead of storing them. The block is
                # split into a pure (graphdef, state) pair so jax.checkpoint sees a plain function.
                graphdef, state = nnx.split(block)
                h, aux = jax.checkpoint(lambda st, x, r: nnx.merge(graphdef, st)(x, dropout_rng=r))(state, h, rng)
            else:
                h, aux = block(h, dropout_rng=rng)
            per_block.append(aux)
        with jax.named_scope("final_norm"):
            final = self.layer_norm_final(h)
        aux_loss = sum((a["ar_ssm_gate_l1_loss"] for a in per_block if "ar_ssm_gate_l1_loss" in a),
                       jnp.zeros((), jnp.float32))
        return final, {"aux_loss": aux_loss, "blocks": per_block}

    @reference_matmul_precision
    def logits_from_hidden(self, final: jax.Array, *, inference: bool = False) -> jax.Array:
        """LM head: float32 logits (..., V) from `hidden_states` output."""
        with jax.named_scope("lm_head"):
            if isinstance(self.lm_head, LNSLinear):
                logits = self.lm_head(final, inference=inference)
            elif isinstance(self.lm_head, TiedHTTHead):
                logits = self.lm_head(final, self.token_embedding)
            else:
                logits = self.lm_head(final)
            return logits.astype(jnp.float32)

    def forward(self, ids: jax.Array, *, dropout_rng: jax.Array | None = None, compute_dtype: Any = jnp.float32,
                inference: bool = False) -> tuple[jax.Array, dict[str, Any]]:
        """inference=True selects inference-only paths (LNS matmuls when enabled); training never sets it."""
        final, aux = self.hidden_states(ids, dropout_rng=dropout_rng, compute_dtype=compute_dtype)
        return self.logits_from_hidden(final, inference=inference), aux

    def __call__(self, ids: jax.Array, *, inference: bool = False) -> jax.Array:
        return self.forward(ids, inference=inference)[0]

