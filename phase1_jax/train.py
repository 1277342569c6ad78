"""A pure, jit-compiled training step and the host-side loop around it.

    state = create_train_state(model_config, train_config)
    step_fn = make_train_step(state.graphdef ...)      # jitted, state donated
    state, metrics = step_fn(state, batch)

The step is a pure function of (TrainState, Batch): the model is split into a static graph definition and
array state outside `jit` (`nnx.split`) and merged back inside, so NNX's Python bookkeeping never runs per
step. Everything host-side (logging, evaluation, the rank curriculum, checkpoints) lives in `train_loop`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from .config import ModelConfig, TrainConfig
from .data import Batch
from .errors import NumericalInstabilityError
from .models.common import split_model
from .models.resnet_bk import ResNetBK
from .phase1 import stability_summary
from .torch_optim import apply_updates, torch_adam, torch_adamw, torch_clip_by_global_norm


@struct.dataclass
class GuardState:
    """What the in-step guard remembers: the last accepted losses (a ring buffer) and the skips so far."""

    losses: jax.Array  # (spike_window,) float32
    accepted: jax.Array  # number of losses ever written into the ring
    consecutive_skips: jax.Array
    skipped_total: jax.Array

    @classmethod
    def create(cls, window: int) -> "GuardState":
        # Separate arrays: the state is donated, and one buffer may not be donated twice.
        return cls(losses=jnp.zeros((window,), jnp.float32), accepted=jnp.zeros((), jnp.int32),
                   consecutive_skips=jnp.zeros((), jnp.int32), skipped_total=jnp.zeros((), jnp.int32))


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    buffers: nnx.State  # Buffer and RankState variables: checkpointed, not optimised
    opt_state: Any
    rng: jax.Array
    guard: GuardState


# Faults the training step can be told to inject (`train --inject-fault`, a testing aid): the loss of that step
# becomes NaN, or every gradient +inf.
FAULT_NONE, FAULT_NAN_LOSS, FAULT_INF_GRAD = 0, 1, 2


def build_model(config: ModelConfig, seed: int = 0) -> ResNetBK:
    return ResNetBK(config, rngs=nnx.Rngs(params=seed))


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    decay_steps = max(cfg.steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps, end_value=cfg.learning_rate * cfg.min_lr_ratio)


def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    """learning_rate_schedule(cfg)(step) / learning_rate in Python doubles: a torch LambdaLR's lambda."""
    if step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    decay_steps = max(cfg.steps, cfg.warmup_steps + 1) - cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup_steps, decay_steps) / decay_steps))
    return (1 - cfg.min_lr_ratio) * cosine + cfg.min_lr_ratio


_EXPERT_LEAVES = ("w1", "b1", "w2", "b2", "w1_a", "w1_b", "w2_a", "w2_b")  # stacked (E, ...) experts


def _module_path(path) -> tuple:
    return tuple(e.key for e in path if isinstance(e, jax.tree_util.DictKey))


def _is_expert_leaf(keys: tuple) -> bool:
    return len(keys) >= 2 and keys[-2] == "moe_ffn" and keys[-1] in _EXPERT_LEAVES


def torch_param_axes(params) -> Any:
    """Leading axes of each leaf that enumerate separate torch tensors: the stacked experts (one per expert)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: int(_is_expert_leaf(_module_path(path))), params)


def expert_has_grad(grads) -> Any:
    """Which torch tensors get a gradient: all but the experts that received no token.

    The reference runs an expert only on the tokens routed to it and skips one that got none, so its four
    tensors have no .grad and torch's optimizer leaves them (and their moments and step count) untouched. Our
    dense MoE gives such an expert exactly zero gradients, while an expert that got a token has a nonzero
    gradient (its output bias sees the routed tokens' upstream gradients). Limitation: an expert whose every
    routing weight underflows to 0 counts as absent, where torch would step it with zero gradients.
    """
    used: dict[tuple, jax.Array] = {}
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        keys = _module_path(path)
        if _is_expert_leaf(keys):
            nonzero = jnp.any(g.reshape(g.shape[0], -1) != 0, axis=1)
            used[keys[:-1]] = used[keys[:-1]] | nonzero if keys[:-1] in used else nonzero
    return jax.tree_util.tree_map_with_path(
        lambda path, _: used[_module_path(path)[:-1]] if _is_expert_leaf(_module_path(path)) else True, grads)


def decay_mask(params) -> Any:
    """Decay only matrices: biases, LayerNorm scales, bk_scale and 1-D factors are left alone (judged per
    torch tensor, so a stacked expert bias is a vector)."""
    axes = torch_param_axes(params)
    return jax.tree.map(lambda p, k: p.ndim - k >= 2, params, axes)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optimizer that `training.optimizer` names, after global-norm clipping unless grad_clip_norm is null.

    torch_adamw / torch_adam reproduce torch.optim.AdamW / Adam bit for bit (phase1_jax.torch_optim) over
    `model.parameters()` in one group: every parameter decays, as in torch; the schedule is a LambdaLR over
    `lr_multiplier`, clipping torch's clip_grad_norm_. Apply their updates with `torch_optim.apply_updates`
    (the training step does).
    """
    if cfg.optimizer == "adamw":
        clip = [] if cfg.grad_clip_norm is None else [optax.clip_by_global_norm(cfg.grad_clip_norm)]
        return optax.chain(*clip, optax.adamw(learning_rate_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                                              weight_decay=cfg.weight_decay, mask=decay_mask))
    clip = [] if cfg.grad_clip_norm is None else [torch_clip_by_global_norm(cfg.grad_clip_norm)]
    adam = torch_adamw if cfg.optimizer == "torch_adamw" else torch_adam
    return optax.chain(*clip, adam(lambda step: cfg.learning_rate * lr_multiplier(cfg, step), total_steps=cfg.steps,
                                   b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   param_axes=torch_param_axes, has_grad=expert_has_grad))


def create_train_state(model: ResNetBK, train_cfg: TrainConfig,
                       optimizer: optax.GradientTransformation | None = None):
    """Returns (graphdef, TrainState, optimizer)."""
    optimizer = optimizer or make_optimizer(train_cfg)
    graphdef, params, buffers = split_model(model)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                       opt_state=optimizer.init(params), rng=jax.random.key(train_cfg.seed),
                       guard=GuardState.create(train_cfg.spike_window))
    return graphdef, state, optimizer


def _cast_floating(tree, dtype):
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def chunked_cross_entropy(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
                          chunk_tokens: int) -> jax.Array:
    """Mean next-token cross-entropy of head(hidden) without ever holding all the logits.

    The tokens are cut into chunks of `chunk_tokens` (the last one padded and masked); each chunk's logits are
    computed, reduced to a loss and dropped, and recomputed in the backward pass (`jax.checkpoint`), so memory
    holds one chunk's (chunk x vocab) logits instead of the batch's. Equal to `cross_entropy(head(hidden))` up to
    the order of the final sum.
    """
    d = hidden.shape[-1]
    flat_h = hidden.reshape(-1, d)
    flat_t = targets.reshape(-1)
    total = flat_t.shape[0]
    chunk_tokens = min(chunk_tokens, total)
    chunks = -(-total // chunk_tokens)
    pad = chunks * chunk_tokens - total
    weights = jnp.pad(jnp.ones((total,), jnp.float32), (0, pad))
    flat_h = jnp.pad(flat_h, ((0, pad), (0, 0))).reshape(chunks, chunk_tokens, d)
    flat_t = jnp.pad(flat_t, (0, pad)).reshape(chunks, chunk_tokens)

    @jax.checkpoint
    def chunk_loss(h, t, w):
        losses = optax.softmax_cross_entropy_with_integer_labels(head(h).astype(jnp.float32), t)
        return jnp.sum(losses * w)

    with jax.named_scope("cross_entropy"):
        sums = jax.lax.map(lambda xs: chunk_loss(*xs), (flat_h, flat_t, weights.reshape(chunks, chunk_tokens)))
        return jnp.sum(sums) / total


def loss_fn(params: nnx.State, buffers: nnx.State, graphdef: nnx.GraphDef, batch: Batch,
            dropout_rng: jax.Array | None, compute_dtype=jnp.float32, loss_chunk_tokens: int | None = None,
            remat: bool | None = None):
    """Next-token cross-entropy plus every auxiliary loss the modules return. Returns (loss, metrics).

    remat: per-block rematerialisation; None keeps the model's own setting."""
    if compute_dtype != jnp.float32:
        params = _cast_floating(params, compute_dtype)
    model = nnx.merge(graphdef, params, buffers)
    final, aux = model.hidden_states(batch.inputs, dropout_rng=dropout_rng, compute_dtype=compute_dtype,
                                     remat=remat)
    if loss_chunk_tokens is None:
        logits = model.logits_from_hidden(final)
        with jax.named_scope("cross_entropy"):
            ce = cross_entropy(logits, batch.targets)
    else:
        ce = chunked_cross_entropy(model.logits_from_hidden, final, batch.targets, loss_chunk_tokens)
    loss = ce + aux["aux_loss"]
    entropies = [b["routing_entropy"] for b in aux["blocks"]]
    metrics = {"ce_loss": ce, "aux_loss": aux["aux_loss"], "routing_entropy": jnp.mean(jnp.stack(entropies))}
    p1 = model.config.phase1
    if p1 is not None and p1.stability_monitoring_enabled:
        # Computed on device from this step's G and v: no host sync (the loop fetches them with the loss).
        with jax.named_scope("stability"):
            metrics.update(jax.lax.stop_gradient(stability_summary(aux, model.config.bk_direction)))
    return loss, metrics


def _path_names(path) -> list:
    return [getattr(entry, "key", getattr(entry, "name", None)) for entry in path]


def _map_named_leaves(tree, name: str, fn):
    """Applies fn to every leaf whose path contains the attribute `name` (leaves are Variable values)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(x) if name in _path_names(path) else x, tree)


def _advance_scattering_counters(buffers: nnx.State, config: ModelConfig) -> nnx.State:
    """The reference increments every MoE's scattering counter on each forward when the term is active."""
    if config.numerics != "reference" or config.scattering_scale <= 0:
        return buffers
    return _map_named_leaves(buffers, "scattering_step_counter", lambda x: x + 1)


_STABILITY_WORST = {"stability/log_det_per_token": jnp.min, "stability/g_abs_min": jnp.min}


def _accumulated_grads(grad_fn, params, batch: Batch, dropout_rng, micro_batches: int):
    """Loss, metrics and gradients of the whole batch, as the mean over `micro_batches` equal slices computed one
    after the other (gradient accumulation: the same mean over the same tokens, less memory)."""
    if micro_batches == 1:
        return grad_fn(params, batch, dropout_rng)
    slices = Batch(*(x.reshape(micro_batches, -1, *x.shape[1:]) for x in batch))
    rngs = jax.random.split(dropout_rng, micro_batches)

    def body(acc, xs):
        (loss, metrics), grads = grad_fn(params, Batch(*xs[0]), xs[1])
        acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)
        return acc, (loss, metrics)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    summed, (losses, metrics) = jax.lax.scan(body, zeros, (tuple(slices), rngs))
    grads = jax.tree.map(lambda a, p: (a / micro_batches).astype(p.dtype), summed, params)
    # Means over the slices; the worst-case stability metrics keep their worst case.
    metrics = {k: (_STABILITY_WORST.get(k, jnp.max) if k.startswith("stability/") else jnp.mean)(v)
               for k, v in metrics.items()}
    return (jnp.mean(losses), metrics), grads


def _guard(guard: GuardState, loss, grad_norm, cfg: TrainConfig):
    """(skip, new guard): skip a step whose loss or gradient norm is not finite, or whose loss is a spike."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    skip = ~finite
    window = guard.losses.shape[0]
    if cfg.spike_sigma is not None:
        n = jnp.minimum(guard.accepted, window)
        valid = jnp.arange(window) < n
        mean = jnp.sum(jnp.where(valid, guard.losses, 0.0)) / jnp.maximum(n, 1)
        var = jnp.sum(jnp.where(valid, (guard.losses - mean) ** 2, 0.0)) / jnp.maximum(n - 1, 1)
        # A floor on the spread (1 % of the loss): a flat stretch of losses must not make noise look like a spike.
        spread = jnp.maximum(jnp.sqrt(var), 0.01 * jnp.abs(mean))
        skip = skip | ((n >= window // 2) & (loss > mean + cfg.spike_sigma * spread))
    slot = guard.accepted % window
    new = GuardState(
        losses=jnp.where(skip, guard.losses, guard.losses.at[slot].set(loss.astype(jnp.float32))),
        accepted=jnp.where(skip, guard.accepted, guard.accepted + 1),
        consecutive_skips=jnp.where(skip, guard.consecutive_skips + 1, 0),
        skipped_total=guard.skipped_total + skip.astype(jnp.int32))
    return skip, new


def _select(skip, old, new):
    """old where skip else new, leaf by leaf: a select, so NaNs in the rejected update cannot leak (0 * NaN = NaN)."""
    return jax.tree.map(lambda o, n: jnp.where(skip, o, n), old, new)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, model_cfg: ModelConfig,
                    train_cfg: TrainConfig, *, jit: bool = True) -> Callable[..., tuple]:
    """train_step(state, batch, fault=FAULT_NONE) -> (state, metrics), jitted with the state donated.

    Gradients are accumulated over `training.micro_batches` slices; `training.remat` overrides the model's
    rematerialisation. A step with a non-finite loss or gradient, or a loss spike, leaves parameters and
    optimizer state as they were (metrics["skipped"] = 1); the host loop decides what to do after several.
    """
    compute_dtype = jnp.bfloat16 if train_cfg.compute_dtype == "bfloat16" else jnp.float32
    schedule = learning_rate_schedule(train_cfg)
    remat = {"model": None, "none": False, "blocks": True}[train_cfg.remat]

    def grad_fn(params, buffers, batch, rng):
        return jax.value_and_grad(loss_fn, has_aux=True)(params, buffers, graphdef, batch, rng, compute_dtype,
                                                         train_cfg.loss_chunk_tokens, remat)

    def train_step(state: TrainState, batch: Batch, fault=FAULT_NONE):
        rng, dropout_rng = jax.random.split(state.rng)
        (loss, metrics), grads = _accumulated_grads(
            lambda p, b, r: grad_fn(p, state.buffers, b, r), state.params, batch, dropout_rng,
            train_cfg.micro_batches)
        loss = jnp.where(fault == FAULT_NAN_LOSS, jnp.nan, loss)
        grads = jax.tree.map(lambda g: jnp.where(fault == FAULT_INF_GRAD, jnp.inf, g), grads)
        grad_norm = optax.tree.norm(grads)
        skip, guard = _guard(state.guard, loss, grad_norm, train_cfg)
        with jax.named_scope("optimizer"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=_select(skip, state.params, params),
                               buffers=_advance_scattering_counters(state.buffers, model_cfg),
                               opt_state=_select(skip, state.opt_state, opt_state), rng=rng, guard=guard)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                       skipped=skip.astype(jnp.float32), consecutive_skips=guard.consecutive_skips,
                       skipped_total=guard.skipped_total)
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0) if jit else train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[nnx.State, nnx.State, Batch], jax.Array]:
    @jax.jit
    def eval_step(params, buffers, batch: Batch):
        model = nnx.merge(graphdef, params, buffers)
        return cross_entropy(model(batch.inputs), batch.targets)

    return eval_step


def evaluate(eval_step, params, buffers, batches: Iterable[Batch]) -> float:
    losses = [eval_step(params, buffers, b) for b in batches]
    return float(np.mean(jax.device_get(losses)))


def set_ar_ssm_rank(buffers: nnx.State, rank: int) -> nnx.State:
    """Sets every AR-SSM's traced current_max_rank (a value change: no recompilation)."""
    return _map_named_leaves(buffers, "current_max_rank", lambda x: jnp.full_like(x, rank))


def rank_for_step(step: int, min_rank: int, max_rank: int, warmup_steps: int) -> int:
    """The reference's rank curriculum: linear from min_rank to max_rank over warmup_steps (then constant)."""
    frac = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    return int(min_rank + frac * (max_rank - min_rank))


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    graphdef: nnx.GraphDef
    history: list[dict[str, float]]
    final_val_loss: float | None


def train_loop(model_cfg: ModelConfig, train_cfg: TrainConfig, batch_at: Callable[[int], Batch],
               val_batches: list[Batch], *, on_metrics: Callable[[dict[str, float]], None] | None = None,
               progress: Callable[[int, dict[str, float]], None] | None = None) -> LoopResult:
    """Trains for train_cfg.steps steps; batch_at(step) gives the batch of a step (resumable order)."""
    model = build_model(model_cfg, seed=train_cfg.seed)
    graphdef, state, optimizer = create_train_state(model, train_cfg)
    del model
    step_fn = make_train_step(graphdef, optimizer, model_cfg, train_cfg)
    eval_step = make_eval_step(graphdef)
    p1 = model_cfg.phase1
    use_curriculum = p1 is not None and p1.ar_ssm_enabled
    history: list[dict[str, float]] = []
    val_loss = None
    tokens_per_step = train_cfg.batch_size * batch_at(0).inputs.shape[1]
    last_time, last_step = time.perf_counter(), 0
    for step in range(train_cfg.steps):
        if use_curriculum:
            rank = rank_for_step(step, p1.ar_ssm_min_rank, p1.ar_ssm_max_rank, p1.ar_ssm_rank_warmup_steps)
            state = state.replace(buffers=set_ar_ssm_rank(state.buffers, rank))
        state, metrics = step_fn(state, batch_at(step))
        done = step + 1
        if done % train_cfg.log_every == 0 or done == train_cfg.steps or done % train_cfg.eval_every == 0:
            record = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            record["tokens_per_sec"] = tokens_per_step * (done - last_step) / max(now - last_time, 1e-9)
            last_time, last_step = now, done
            record["step"] = done
            if not np.isfinite(record["loss"]):
                # Host-side decision, outside jit: stop rather than train on (and checkpoint) NaNs.
                raise NumericalInstabilityError("training", {k: v for k, v in record.items()
                                                             if k in ("step", "loss", "grad_norm", "learning_rate")})
            if done % train_cfg.eval_every == 0 or done == train_cfg.steps:
                val_loss = evaluate(eval_step, state.params, state.buffers, val_batches)
                record["val_loss"] = val_loss
            history.append(record)
            if on_metrics:
                on_metrics(record)
            if progress:
                progress(done, record)
    return LoopResult(state=state, graphdef=graphdef, history=history, final_val_loss=val_loss)
