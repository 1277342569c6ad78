"""The PyTorch reference's training step, built from the twin, for generating training trajectories in tests.

`build_torch_twin(config)` is an inference twin: its MoE runs every expert on every token and its BK-Core is
differentiated by plain autograd. Training like the reference needs two of the reference's own behaviours
(REFERENCE_SPEC §1.8, §1.9), patched onto the twin's instances here:

* the MoE dispatches: an expert runs only on the tokens routed to it, and one that gets no token is not run at
  all, so its tensors get no .grad and torch's optimizer skips them;
* BK-Core's custom backward (the heuristic blend of -Re(g G^2) and -Re(g / G^2), clamped to ±1000).

`train_reference` then trains with the real torch.optim.Adam / AdamW (single-tensor path, torch's CPU default),
an optional LambdaLR and clip_grad_norm_, and records what a golden training case holds.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from phase1_jax.config import ModelConfig
from phase1_jax.converters.torch_io import numpy_to_tensor, tensor_to_numpy
from phase1_jax.converters.torch_twins import build_torch_twin, reference_resolvent_diagonal

V_MAX = 3.0
FEATURE_CLAMP = 10.0


class _ReferenceBKCore(torch.autograd.Function):
    """features (B, N, 2) = [Re G, Im G] of the reference resolvent; backward per REFERENCE_SPEC §1.8."""

    @staticmethod
    def forward(ctx, diagonal, super_diagonal, sub_diagonal, z):
        g = reference_resolvent_diagonal(diagonal, super_diagonal, sub_diagonal, z)
        ctx.save_for_backward(g)
        return torch.stack([g.real, g.imag], dim=-1).float()

    @staticmethod
    def backward(ctx, grad_features):
        (g,) = ctx.saved_tensors
        upstream = torch.complex(grad_features[..., 0], grad_features[..., 1])
        square = g * g
        magnitude = square.abs()
        # |G^2| is raised to 1e-3 (same phase) before it divides.
        floored = torch.where(magnitude < 1e-3, square / (magnitude + 1e-9) * 1e-3, square)
        analytic = -(upstream * square).real
        heuristic = -(upstream / (floored + 1e-6)).real
        grad = 0.5 * analytic + 0.5 * heuristic
        grad = torch.clamp(torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad)), -1000.0, 1000.0)
        return grad.float(), None, None, None


def _bk_features(self, x):
    potential = torch.clamp(self.v_proj(x).squeeze(-1), -V_MAX, V_MAX)
    diagonal = self.h0_diag_base + potential
    return _ReferenceBKCore.apply(diagonal, self.h0_super_base[0], self.h0_sub_base[0], self.z)


def _dispatching_moe(self, x):
    batch, length, d_model = x.shape
    x_flat = x.reshape(batch * length, d_model)
    logits = self.gating_network(x_flat)
    if self.use_scattering:
        # The reference's inert shift: the same batch-normalised token norm added to every expert's logit.
        norms = x_flat.norm(dim=-1, keepdim=True)
        warmup = self.scattering_scale_warmup_steps
        scale = self.scattering_scale * (2.0 if warmup > 0 and int(self.scattering_step_counter) < warmup else 1.0)
        logits = logits + scale * ((norms - norms.mean()) / (norms.std() + 1e-6))
        self.scattering_step_counter += 1
    if self.top_k >= self.num_experts:
        gates = torch.softmax(logits, dim=-1)
        out = torch.sum(torch.stack([e(x_flat) for e in self.experts], dim=1) * gates.unsqueeze(-1), dim=1)
        return out.view(batch, length, d_model)
    top_logits, top_experts = torch.topk(logits, self.top_k, dim=-1)
    gates = torch.softmax(top_logits, dim=-1)
    out = torch.zeros_like(x_flat)
    for index, expert in enumerate(self.experts):
        tokens, slots = (top_experts == index).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue  # never run: no .grad for this expert
        out[tokens] = out[tokens] + expert(x_flat[tokens]) * gates[tokens, slots].unsqueeze(-1)
    return out.view(batch, length, d_model)


def reference_model(config: ModelConfig, state: dict[str, np.ndarray]) -> torch.nn.Module:
    """The twin with the reference's training behaviours, holding `state`, in eval mode (dropout off)."""
    if config.numerics != "reference" or config.phase1 is not None:
        raise ValueError("the reference trains the baseline model in reference numerics")
    model = build_torch_twin(config)
    model.load_state_dict({k: numpy_to_tensor(v) for k, v in state.items()}, strict=True)
    for block in model.blocks:
        block.bk_layer.bk_features = types.MethodType(_bk_features, block.bk_layer)
        block.bk_layer.moe_ffn.forward = types.MethodType(_dispatching_moe, block.bk_layer.moe_ffn)
    return model.eval()


@dataclass
class Trajectory:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)  # float64 sum over the gradients present
    states: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # parameters before update NN
    skipped: list[list[str]] = field(default_factory=list)  # per step: parameters without a gradient


def train_reference(config: ModelConfig, state: dict[str, np.ndarray], ids: np.ndarray, targets: np.ndarray, *,
                    lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                    decoupled: bool = True, lr_lambda: Callable[[int], float] | None = None,
                    clip: float | None = None, save_every: int = 10) -> Trajectory:
    """Trains on ids[s] -> targets[s] for s < len(ids) as the golden training cases were made."""
    torch.manual_seed(0)
    model = reference_model(config, state)
    params = [p for _, p in model.named_parameters()]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    out = Trajectory()
    steps = len(ids)
    for s in range(steps + 1):
        if s % save_every == 0 or s == steps:
            out.states[s] = {k: tensor_to_numpy(v) for k, v in model.state_dict().items()}
        if s == steps:
            break
        opt.zero_grad(set_to_none=True)
        logits = model(torch.from_numpy(np.asarray(ids[s], np.int64)))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                               torch.from_numpy(np.asarray(targets[s], np.int64)).reshape(-1))
        loss.backward()
        out.losses.append(loss.item())
        grads = [p.grad.double() for p in params if p.grad is not None]
        out.grad_norms.append(math.sqrt(sum(float((g * g).sum()) for g in grads)))
        out.skipped.append([k for k, p in model.named_parameters() if p.grad is None])
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if sched:
            sched.step()
    return out
