"""PyTorch twins of phase1-jax's ResNet-BK models: an exported model runs in plain PyTorch.

`build_torch_twin(config)` returns an `nn.Module` whose `state_dict()` has exactly the keys, order, shapes and
dtypes of `model_key_map(config)` (the layout `state_dict_from_model` exports), so

    twin = build_torch_twin(model.config).eval()
    twin.load_state_dict({k: numpy_to_tensor(v) for k, v in state_dict_from_model(model).items()}, strict=True)
    logits = twin(ids)                      # (B, L) int64 -> (B, L, V) float32, equal to model(ids)

The twin mirrors the JAX forward (phase1_jax/models/resnet_bk.py) in eval mode:

* numerics "reference": the PyTorch reference's BK-Core (REFERENCE_SPEC §1.7: unnormalised complex128 determinant
  sweeps, so its overflow cliff is reproduced) and the inert scattering term of the MoE router (§1.9); the input
  length must equal n_seq.
* numerics "native": the causal or bidirectional continued fractions, computed sequentially in complex128 (the JAX
  model uses a normalised parallel scan in float32; both are finite at any length); any length 1..n_seq.
* Phase 1: HTT token (and optionally position) embedding, AR-SSM sub-layers before the BK/MoE sub-layer, an
  LNS head as an ordinary Linear (it equals the JAX model's non-inference logits), a head tied to the HTT cores
  (lm_head = bias only) and low-rank experts (each expert Linear a `LowRankLinear`: b(a(x)) + bias).

The twin is meant for inference: autograd runs through it but does not reproduce the JAX model's custom BK-Core
gradients. Parameters are float32 (a bfloat16 export is upcast by `load_state_dict`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phase1_jax.config import ModelConfig

__all__ = [
    "build_torch_twin",
    "ResNetBKTwin",
    "ResNetBKBlockTwin",
    "MoEResNetBKLayerTwin",
    "SparseMoETwin",
    "LowRankLinear",
    "TiedHTTHeadTwin",
    "HolographicTTEmbeddingTwin",
    "AdaptiveRankSemiseparableTwin",
    "reference_resolvent_diagonal",
    "causal_resolvent_diagonal",
    "bidirectional_resolvent_diagonal",
]

# Constants of the reference (REFERENCE_SPEC §1.1, §1.7, §1.9); plain Python values, not state.
V_MAX = 3.0
FEATURE_CLAMP = 10.0
REFERENCE_DET_EPS = 1e-18
REFERENCE_MAX_MAGNITUDE = 50.0
REFERENCE_CLIP_EPS = 1e-9
SCATTERING_STD_EPS = 1e-6
LAYER_NORM_EPS = 1e-5


# ------------------------------------------------------------------------------------------------------------------
# BK-Core: the diagonal of (H - zI)^-1 for tridiagonal H (diagonal a, super-diagonal b, sub-diagonal c).
# All three take a (B, N) float32, b and c (N-1,) float32, z a complex scalar tensor; they return complex64 (B, N).
# ------------------------------------------------------------------------------------------------------------------

def _shifted_diagonal(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return a.to(torch.complex128) - z.to(torch.complex128)


def _bonds(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """k_t = c_{t-1} b_{t-1} in complex128 (the product the reference forms), shape (N-1,)."""
    return c.to(torch.complex128) * b.to(torch.complex128)


def reference_resolvent_diagonal(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The reference's `get_tridiagonal_inverse_diagonal` (REFERENCE_SPEC §1.7 steps 1-7), batched.

    The determinants theta/phi are unnormalised, so past a few hundred positions they overflow complex128 and the
    result collapses to zeros; that cliff is part of what this reproduces. Note the phi sweep couples phi_i to
    phi_{i+2} with bond c_i b_i (one bond left of the textbook expansion), as the reference does.
    """
    d = _shifted_diagonal(a, z)
    bond = _bonds(b, c)
    n = d.shape[1]
    ones = torch.ones_like(d[:, 0])
    # Python lists rather than in-place writes keep the sweeps usable under autograd.
    theta = [ones, d[:, 0]]
    for k in range(1, n):
        theta.append(d[:, k] * theta[k] - bond[k - 1] * theta[k - 1])
    phi = [ones] * n
    if n > 1:
        phi[n - 2] = d[:, n - 1]
        for i in range(n - 3, -1, -1):
            phi[i] = d[:, i + 1] * phi[i + 1] - bond[i] * phi[i + 2]
    determinant = theta[n].unsqueeze(1)
    g = torch.stack(theta[:n], dim=1) * torch.stack(phi, dim=1) / (determinant + REFERENCE_DET_EPS)
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    magnitude = g.abs()
    shrink = torch.where(magnitude > REFERENCE_MAX_MAGNITUDE,
                         REFERENCE_MAX_MAGNITUDE / (magnitude + REFERENCE_CLIP_EPS), torch.ones_like(magnitude))
    return (g * shrink).to(torch.complex64)


def _continued_fraction(d: torch.Tensor, bond: torch.Tensor) -> torch.Tensor:
    """g_0 = 1/d_0, g_t = 1/(d_t - bond_{t-1} g_{t-1}) along axis 1, complex128."""
    g = [1.0 / d[:, 0]]
    for t in range(1, d.shape[1]):
        g.append(1.0 / (d[:, t] - bond[t - 1] * g[-1]))
    return torch.stack(g, dim=1)


def causal_resolvent_diagonal(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """g_t = [(H_{0..t} - z)^-1]_{tt}: depends on a_0..a_t only. |g| <= 1 for Im z > 0, so it never overflows."""
    return _continued_fraction(_shifted_diagonal(a, z), _bonds(b, c)).to(torch.complex64)


def bidirectional_resolvent_diagonal(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                                     z: torch.Tensor) -> torch.Tensor:
    """G_ii = 1/(d_i - k_i gL_{i-1} - k_{i+1} gR_{i+1}) from left and right continued fractions."""
    d = _shifted_diagonal(a, z)
    bond = _bonds(b, c)
    left = _continued_fraction(d, bond)
    right = _continued_fraction(d.flip(1), bond.flip(0)).flip(1)
    zero = torch.zeros_like(d[:, :1])
    from_left = torch.cat([zero, bond * left[:, :-1]], dim=1)
    from_right = torch.cat([bond * right[:, 1:], zero], dim=1)
    return (1.0 / (d - from_left - from_right)).to(torch.complex64)


# ------------------------------------------------------------------------------------------------------------------
# Modules. Attribute names and registration order give the state-dict keys and their order.
# ------------------------------------------------------------------------------------------------------------------

class LowRankLinear(nn.Module):
    """x -> b(a(x)) + bias: a Linear (in -> out) whose weight is the rank-`rank` product b.weight @ a.weight.

    The JAX expert computes (x A) B + bias with A = a.weight.T and B = b.weight.T, in this order.
    """

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.bias


def _expert_linear(in_features: int, out_features: int, rank: int | None) -> nn.Module:
    return nn.Linear(in_features, out_features) if rank is None else LowRankLinear(in_features, out_features, rank)


class SparseMoETwin(nn.Module):
    """Top-k softmax routing over two-layer ReLU experts (dense softmax routing when top_k >= num_experts).

    Every expert runs on every token and is mixed with weights that are zero for unselected experts, as in the
    JAX model. The scattering term (reference numerics only) shifts all of a token's expert logits equally, so it
    changes no routing; it is kept for fidelity, including the 2x warm-up read from `scattering_step_counter`.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, dropout: float, *, scattering_scale: float,
                 scattering_scale_warmup_steps: int, use_scattering: bool, expert_rank: int | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.scattering_scale = scattering_scale
        self.scattering_scale_warmup_steps = scattering_scale_warmup_steps
        self.use_scattering = use_scattering and scattering_scale > 0
        # Registered first: the reference's buffer precedes the experts in its state dict.
        self.register_buffer("scattering_step_counter", torch.zeros((), dtype=torch.int64))
        # Sequential indices 0 and 3 are the reference's expert keys (1 = ReLU, 2 = Dropout hold no state).
        self.experts = nn.ModuleList(
            nn.Sequential(_expert_linear(d_model, 2 * d_model, expert_rank), nn.ReLU(), nn.Dropout(dropout),
                          _expert_linear(2 * d_model, d_model, expert_rank))
            for _ in range(num_experts))
        self.gating_network = nn.Linear(d_model, num_experts)

    def routing_weights(self, x_flat: torch.Tensor) -> torch.Tensor:
        """(T, E) mixing weights, zero for the experts a token is not routed to."""
        logits = self.gating_network(x_flat)
        if self.use_scattering:
            norms = torch.linalg.vector_norm(x_flat.float(), dim=-1)
            # Statistics over every token of the batch (unbiased std), as the reference computes them.
            normalised = (norms - norms.mean()) / (norms.std(unbiased=True) + SCATTERING_STD_EPS)
            warmup = self.scattering_scale_warmup_steps
            in_warmup = warmup > 0 and int(self.scattering_step_counter) < warmup
            scale = 2.0 * self.scattering_scale if in_warmup else self.scattering_scale
            logits = logits + (scale * normalised).unsqueeze(-1).to(logits.dtype)
            if self.training:
                # The reference counts every forward; the JAX model counts training steps. Eval counts nothing.
                self.scattering_step_counter += 1
        if self.top_k >= self.num_experts:
            return torch.softmax(logits, dim=-1)
        top_values, top_indices = torch.topk(logits, self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, top_indices, torch.softmax(top_values, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        x_flat = x.reshape(batch * length, d_model)
        weights = self.routing_weights(x_flat)
        expert_outputs = torch.stack([expert(x_flat) for expert in self.experts], dim=1)  # (T, E, D)
        mixed = torch.einsum("te,ted->td", weights.to(expert_outputs.dtype), expert_outputs)
        return mixed.reshape(batch, length, d_model)


class MoEResNetBKLayerTwin(nn.Module):
    """out = MoE(x) + bk_scale * output_proj(clamp(BK features, ±10)), BK features = [Re G_ii, Im G_ii]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        from phase1_jax.models.resnet_bk import expert_rank  # lazy: importing the JAX model pulls in jax

        d, n = config.d_model, config.n_seq
        self.numerics = config.numerics
        self.bk_direction = config.bk_direction
        self.bk_scale = nn.Parameter(torch.ones((), dtype=torch.float32))
        self.register_buffer("h0_diag_base", torch.full((1, n), -2.0))
        self.register_buffer("h0_sub_base", torch.ones(1, n - 1))
        self.register_buffer("h0_super_base", torch.ones(1, n - 1))
        self.register_buffer("z", torch.tensor(1j, dtype=torch.complex64))
        self.moe_ffn = SparseMoETwin(d, config.num_experts, config.top_k, config.dropout,
                                     scattering_scale=config.scattering_scale,
                                     scattering_scale_warmup_steps=config.scattering_scale_warmup_steps,
                                     use_scattering=config.numerics == "reference",
                                     expert_rank=expert_rank(config))
        self.v_proj = nn.Linear(d, 1)
        self.output_proj = nn.Linear(2, d)

    def resolvent_diagonal(self, diagonal: torch.Tensor, super_diagonal: torch.Tensor,
                           sub_diagonal: torch.Tensor) -> torch.Tensor:
        if self.numerics == "reference":
            return reference_resolvent_diagonal(diagonal, super_diagonal, sub_diagonal, self.z)
        if self.bk_direction == "bidirectional":
            return bidirectional_resolvent_diagonal(diagonal, super_diagonal, sub_diagonal, self.z)
        return causal_resolvent_diagonal(diagonal, super_diagonal, sub_diagonal, self.z)

    def bk_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, 2) float32 = [Re G_ii, Im G_ii] before the feature clamp."""
        length = x.shape[1]
        potential = torch.clamp(self.v_proj(x)[..., 0].float(), -V_MAX, V_MAX)
        # Shorter (native) sequences use the leading part of the Hamiltonian buffers.
        diagonal = self.h0_diag_base[0, :length] + potential
        g = self.resolvent_diagonal(diagonal, self.h0_super_base[0, :length - 1], self.h0_sub_base[0, :length - 1])
        return torch.stack([g.real, g.imag], dim=-1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.clamp(self.bk_features(x), -FEATURE_CLAMP, FEATURE_CLAMP).to(x.dtype)
        return self.moe_ffn(x) + self.bk_scale.to(x.dtype) * self.output_proj(features)


class HolographicTTEmbeddingTwin(nn.Module):
    """E[t, j] = sum_rho cos(phase_shift[rho]) core1[t // v2, 0, rho, j1] core2[t % v2, rho, 0, j2], j = j1 d2 + j2,
    first D columns kept (REFERENCE_SPEC §2.1). Ids are validated by the model, not here."""

    def __init__(self, vocab_size: int, d_model: int, rank: int, phase_encoding: bool):
        super().__init__()
        from phase1_jax.models.htt import tt_factorization  # lazy: importing the JAX model pulls in jax

        self.vocab_size = vocab_size
        self.d_model = d_model
        self.phase_encoding = phase_encoding
        self.v1, self.v2, self.d1, self.d2 = tt_factorization(vocab_size, d_model)
        self.core1 = nn.Parameter(torch.zeros(self.v1, 1, rank, self.d1))
        self.core2 = nn.Parameter(torch.zeros(self.v2, rank, 1, self.d2))
        if phase_encoding:
            self.phase_shift = nn.Parameter(torch.zeros(rank))
        else:
            # Kept as a buffer so the keys do not depend on phase_encoding (as in the reference).
            self.register_buffer("phase_shift", torch.zeros(rank))

    def phased_core1(self) -> torch.Tensor:
        """core1 as (v1, r, d1) times cos(phase_shift) on the rank axis."""
        core1 = self.core1[:, 0]
        # Applied before the gather, like the JAX model: the same products, hence the same rounding.
        return core1 * torch.cos(self.phase_shift)[:, None] if self.phase_encoding else core1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        left = self.phased_core1()[torch.div(ids, self.v2, rounding_mode="floor")]  # (..., r, d1)
        right = self.core2[:, :, 0][torch.remainder(ids, self.v2)]  # (..., r, d2)
        table = torch.einsum("...rj,...rk->...jk", left, right)
        return table.reshape(*ids.shape, self.d1 * self.d2)[..., :self.d_model]

    def logits_from_cores(self, h: torch.Tensor) -> torch.Tensor:
        """h @ table.T, shape (..., V), contracted with the cores (core2 first, as the JAX model does): the V x D
        table is never formed."""
        batch = h.shape[:-1]
        padded = F.pad(h, (0, self.d1 * self.d2 - self.d_model)).reshape(*batch, self.d1, self.d2)
        t = torch.einsum("...jk,brk->...jbr", padded, self.core2[:, :, 0])
        logits = torch.einsum("...jbr,arj->...ab", t, self.phased_core1())
        return logits.reshape(*batch, self.v1 * self.v2)[..., :self.vocab_size]


class TiedHTTHeadTwin(nn.Module):
    """logits = h · Eᵀ + bias with E the HTT token embedding's table; the only parameter is the bias."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: torch.Tensor, embedding: HolographicTTEmbeddingTwin) -> torch.Tensor:
        return embedding.logits_from_cores(h) + self.bias.to(h.dtype)


class AdaptiveRankSemiseparableTwin(nn.Module):
    """y = T_conv(x) + output_proj(cumsum_t(U x ⊙ g) ⊙ (V x ⊙ g)), g = sigmoid(MLP(x)) with ranks >= current_max_rank
    masked off. local_conv "centered" taps x[t-1], x[t], x[t+1] (the reference's padding 1); "causal" taps
    x[t-2], x[t-1], x[t] (left padding 2), with the same Conv1d weight."""

    def __init__(self, d_model: int, max_rank: int, gate_hidden_dim: int, local_conv: str):
        super().__init__()
        if local_conv not in ("causal", "centered"):
            raise ValueError(f"local_conv must be 'causal' or 'centered'; got {local_conv!r}")
        self.max_rank = max_rank
        self.local_conv = local_conv
        # Set it below max_rank to mirror a rank curriculum; the JAX model's default keeps every rank.
        self.current_max_rank = max_rank
        self.complexity_gate = nn.Sequential(nn.Linear(d_model, gate_hidden_dim), nn.ReLU(),
                                             nn.Linear(gate_hidden_dim, max_rank), nn.Sigmoid())
        self.U_proj = nn.Linear(d_model, max_rank, bias=False)
        self.V_proj = nn.Linear(d_model, max_rank, bias=False)
        self.T_conv = nn.Conv1d(d_model, d_model, kernel_size=3, groups=d_model, bias=False)
        self.output_proj = nn.Linear(max_rank, d_model)

    def local_mixing(self, x: torch.Tensor) -> torch.Tensor:
        padding = (1, 1) if self.local_conv == "centered" else (2, 0)
        return self.T_conv(F.pad(x.transpose(1, 2), padding)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.complexity_gate(x)
        active = torch.arange(self.max_rank, device=x.device) < int(self.current_max_rank)
        gates = torch.where(active, gates, torch.zeros_like(gates))
        context = torch.cumsum(self.U_proj(x) * gates, dim=1) * (self.V_proj(x) * gates)
        return self.local_mixing(x) + self.output_proj(context)


class ResNetBKBlockTwin(nn.Module):
    """[h += ar_ssm(ar_ssm_norm(h))]; h += bk_layer(layer_norm(h))."""

    def __init__(self, config: ModelConfig, *, with_ar_ssm: bool):
        super().__init__()
        d = config.d_model
        if with_ar_ssm:
            p1 = config.phase1
            gate_hidden = p1.ar_ssm_gate_hidden_dim if p1.ar_ssm_gate_hidden_dim is not None \
                else max(d // 4, p1.ar_ssm_min_rank)
            self.ar_ssm_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
            self.ar_ssm = AdaptiveRankSemiseparableTwin(d, p1.ar_ssm_max_rank, gate_hidden, p1.ar_ssm_local_conv)
        else:
            self.ar_ssm_norm = None
            self.ar_ssm = None
        self.layer_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.bk_layer = MoEResNetBKLayerTwin(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.ar_ssm is not None:
            h = h + self.ar_ssm(self.ar_ssm_norm(h))
        return h + self.bk_layer(self.layer_norm(h))


class ResNetBKTwin(nn.Module):
    """The PyTorch twin of `phase1_jax.models.resnet_bk.ResNetBK`: forward(ids (B, L)) -> logits (B, L, V) float32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        from phase1_jax.models.resnet_bk import ResNetBK  # lazy: importing the JAX model pulls in jax

        self.config = config
        d, p1 = config.d_model, config.phase1
        htt = p1 is not None and p1.htt_enabled
        if htt:
            self.token_embedding = HolographicTTEmbeddingTwin(config.vocab_size, d, p1.htt_rank,
                                                              p1.htt_phase_encoding)
        else:
            self.token_embedding = nn.Embedding(config.vocab_size, d)
        if htt and p1.htt_position_embedding:
            self.position_embedding = HolographicTTEmbeddingTwin(config.n_seq, d, p1.htt_rank, p1.htt_phase_encoding)
        else:
            self.position_embedding = nn.Embedding(config.n_seq, d)
        ar_blocks = ResNetBK.ar_ssm_layer_indices(config)
        self.blocks = nn.ModuleList(ResNetBKBlockTwin(config, with_ar_ssm=i in ar_blocks)
                                    for i in range(config.n_layers))
        self.layer_norm_final = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        if p1 is not None and p1.lm_head == "htt_tied":
            self.lm_head = TiedHTTHeadTwin(config.vocab_size)
        else:
            # An LNS head is an ordinary Linear here: its weights are a plain kernel and bias.
            self.lm_head = nn.Linear(d, config.vocab_size)

    def check_ids(self, ids: torch.Tensor) -> None:
        """Rank 2, integer dtype, the numerics mode's length rule, ids in [0, vocab_size)."""
        cfg = self.config
        if ids.dim() != 2:
            raise ValueError(f"token ids must have shape (batch, length); got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be integers; got dtype {ids.dtype}")
        length = ids.shape[1]
        if cfg.numerics == "reference" and length != cfg.n_seq:
            raise ValueError(f"numerics 'reference' needs sequences of exactly n_seq = {cfg.n_seq} tokens; "
                             f"got length {length}")
        if not 1 <= length <= cfg.n_seq:
            raise ValueError(f"sequence length must be between 1 and n_seq = {cfg.n_seq}; got {length}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.check_ids(ids)
        ids = ids.long()
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        h = self.token_embedding(ids) + self.position_embedding(positions)
        for block in self.blocks:
            h = block(h)
        final = self.layer_norm_final(h)
        if isinstance(self.lm_head, TiedHTTHeadTwin):
            return self.lm_head(final, self.token_embedding).float()
        return self.lm_head(final).float()


def build_torch_twin(config: ModelConfig) -> ResNetBKTwin:
    """A PyTorch twin of `ResNetBK(config)`, in eval mode, with placeholder values: load an export into it.

    Its state_dict matches `model_key_map(config)` key for key (order, shapes, dtypes float32/complex64/int64).
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a phase1_jax.config.ModelConfig; got {type(config).__name__}")
    return ResNetBKTwin(config).eval()
