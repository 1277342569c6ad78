"""Adam and AdamW with the arithmetic of torch.optim, as optax transformations.

    tx = optax.chain(torch_clip_by_global_norm(1.0), torch_adamw(3e-3, total_steps=1000))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = apply_updates(params, updates)      # not optax.apply_updates: see "Applying updates"

What torch 2.13 computes on the CPU (`_single_tensor_adam`, torch's default for CPU tensors), per parameter
tensor that has a gradient, at that tensor's own step t (torch counts steps per tensor, in state["step"]):

    AdamW, wd > 0:  p = p * f32(1 - lr*wd)                       param.mul_
    Adam,  wd > 0:  g = fma(p, f32(wd), g)                       grad.add(param, alpha=wd)
                    m = fma(w, g - m, m)    w = f32(1 - b1)      exp_avg.lerp_(grad, 1 - b1), w < 0.5
                    m = fma(w - 1, g - m, g)                     (the same lerp when w >= 0.5)
                    v = fma(f32(1 - b2) * g, g, v * f32(b2))     exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
                    d = sqrt(v) / f32((1 - b2**t) ** 0.5) + f32(eps)
                    p = p + (f32(-lr / (1 - b1**t)) * m) / d     param.addcdiv_(exp_avg, d, value=-step_size)

The fused multiply-adds are ATen's (its vectorised lerp, addcmul and add-with-alpha kernels use FMA); every
other operation rounds to float32 on its own.

Scalars: Python doubles, rounded once to float32 where torch hands them to a float32 kernel. They are computed
on the host with torch's own expressions, into tables indexed by the optimizer step (the learning rate, as
LambdaLR's `base_lr * lambda(step)` gives it) and by the per-tensor step (the bias corrections); inside the
step the only double-precision scalar operation is the IEEE division lr / (1 - b1**t), correctly rounded in
Python and in XLA alike. The tables cover `total_steps` steps; a step beyond them makes the update NaN (loud)
rather than wrong.

Element-wise rounding: XLA lets LLVM contract a*b + c into an FMA wherever it can (also where torch rounds the
product first) and rewrites a division by a broadcast scalar as a multiplication by its reciprocal. So each
torch operation is computed as the correctly rounded float32 result of its exact value, through float64:
products, quotients and square roots of float32 values are exact or correctly rounded there and round
correctly to float32 (53 >= 2*24 + 2 bits; LLVM may narrow them back to the same float32 operation); the FMA
is a float64 sum rounded to odd, then to float32 (exact, as 53 >= 24 + 2), which nothing can narrow or fuse,
so it also serves as the add after a product that torch rounds on its own.

Known differences from torch on the CPU: torch's float32 `Tensor.sqrt` there is MKL's vector sqrt (VML, high
accuracy), which is not correctly rounded (1 ulp off on ~17% of elements here: AMD EPYC, MKL 2024.2), while
this module takes the IEEE square root (as torch's CUDA kernels do); and XLA on CPU flushes subnormal floats to
zero, torch does not. Everything else is bit for bit (tests/test_torch_optim.py).

Parameters without a gradient: torch skips a tensor whose .grad is None (no decay, no moment update, no step
count). `has_grad(grads)` says which parameters have one; `param_axes(params)` says how many leading axes of a
leaf enumerate separate torch tensors (e.g. experts stacked along axis 0), so each keeps its own step count.

Applying updates: an update is the increment torch adds in addcdiv_, so `params + updates` is exact; with
decoupled weight decay torch first rounds p * (1 - lr*wd), which no single increment can reproduce, so those
leaves carry `DecayedIncrement(decay, increment)` and must be applied with `apply_updates` below (optax's
apply_updates refuses them: the tree structures differ).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[int], float]


class TorchAdamState(NamedTuple):
    step: jax.Array  # optimizer steps taken: indexes the learning-rate table (LambdaLR's last_epoch)
    count: Any  # per torch tensor: its state["step"]; shape leaf.shape[:k] + (1,) * (ndim - k)
    mu: Any  # exp_avg
    nu: Any  # exp_avg_sq


class DecayedIncrement(NamedTuple):
    """new = (p * decay) + increment, each rounded to float32 as torch does (mul_ then addcdiv_)."""

    decay: jax.Array
    increment: jax.Array


def _f64_bits(values: list[float]) -> np.ndarray:
    """Doubles as (n, 2) uint32 words: jnp keeps no float64 while x64 is off, so tables travel as bits."""
    return np.asarray(values, np.float64).view(np.uint32).reshape(-1, 2)


def _take_f64(bits: np.ndarray, index: jax.Array) -> jax.Array:
    """bits[index] as float64 (inside `jax.enable_x64`); NaN beyond the table."""
    words = jnp.take(jnp.asarray(bits), index, axis=0, mode="fill", fill_value=0xFFFFFFFF)
    return jax.lax.bitcast_convert_type(words, jnp.float64)


def _f64(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float64)


# Correctly rounded float32 results of exact operations on float32 values; call inside `jax.enable_x64`.
def _mul(a, b) -> jax.Array:
    return (_f64(a) * _f64(b)).astype(jnp.float32)  # the float64 product is exact


def _div(a, b) -> jax.Array:
    # Within 2^-52 relative even as a reciprocal multiply; a float32 quotient is never a float32 midpoint and
    # lies at least 2^-49 relative from every one, so rounding to float32 gives the correctly rounded quotient.
    return (_f64(a) / _f64(b)).astype(jnp.float32)


def _sqrt(a) -> jax.Array:
    return jnp.sqrt(_f64(a)).astype(jnp.float32)


def _fma(a, b, c) -> jax.Array:
    """fma(a, b, c) rounded once: a*b is exact in float64; s + err == a*b + c exactly (TwoSum); s rounded to odd
    keeps the information that rounding to float32 needs. Any FMA contraction XLA applies here is exact too."""
    ab = _f64(a) * _f64(b)
    c = _f64(c)
    s = ab + c
    bb = s - ab
    err = (ab - (s - bb)) + (c - bb)
    even = (jax.lax.bitcast_convert_type(s, jnp.int64) & 1) == 0
    s = jnp.where((err != 0) & even, jnp.nextafter(s, jnp.copysign(jnp.inf, err)), s)
    return s.astype(jnp.float32)


def _add(a, b) -> jax.Array:
    """a + b, with a rounded on its own: LLVM may narrow a float64 product back to float32 and contract it into
    a following add; the float64 FMA above has no float32 form, so nothing can be fused across it."""
    return _fma(a, np.float32(1), b)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} = {value!r}: allowed {allowed}")


def torch_adam(learning_rate: float | Schedule, *, total_steps: int, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
               weight_decay_mask: Any = None, param_axes: Callable[[Any], Any] | None = None,
               has_grad: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
    """torch.optim.Adam (or AdamW with decoupled_weight_decay) for `total_steps` optimizer steps.

    learning_rate: a float, or step -> float (Python double) as torch.optim.lr_scheduler.LambdaLR gives
      `base_lr * lambda(step)` for optimizer step `step` = 0, 1, ...
    weight_decay_mask: pytree of bools (or params -> pytree): leaves that decay; torch's equivalent is a
      param group with weight_decay 0 for the others. Default: all.
    param_axes: params -> pytree of ints, the leading axes of each leaf that enumerate separate torch tensors.
    has_grad: grads -> pytree of bool arrays of shape leaf.shape[:param_axes]: which torch tensors have a
      gradient this step (torch's .grad is not None). Default: all.
    """
    _check(isinstance(total_steps, int) and total_steps >= 1, "total_steps", total_steps, "an integer >= 1")
    _check(0.0 <= b1 < 1.0, "b1", b1, "0 <= b1 < 1")
    _check(0.0 <= b2 < 1.0, "b2", b2, "0 <= b2 < 1")
    _check(eps >= 0.0, "eps", eps, ">= 0")
    _check(weight_decay >= 0.0, "weight_decay", weight_decay, ">= 0")
    lr_at = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
    lrs = [float(lr_at(t)) for t in range(total_steps)]
    bad = [(t, lr) for t, lr in enumerate(lrs) if not (np.isfinite(lr) and lr >= 0.0)]
    _check(not bad, "learning_rate", bad[:1], "finite values >= 0 at every step")

    # Python doubles exactly as torch forms them; index 0 of the per-count tables is never used.
    counts = range(1, total_steps + 1)
    lr_bits = _f64_bits(lrs)
    bias1_bits = _f64_bits([1.0] + [1 - b1 ** float(t) for t in counts])
    bias2_sqrt = np.asarray([1.0] + [(1 - b2 ** float(t)) ** 0.5 for t in counts], np.float32)
    decay = np.asarray([1 - lr * weight_decay for lr in lrs], np.float32)
    lerp_w = np.float32(1 - b1)
    beta2, one_minus_b2 = np.float32(b2), np.float32(1 - b2)
    eps32, wd32 = np.float32(eps), np.float32(weight_decay)

    def leaf_axes(params):
        axes = param_axes(params) if param_axes is not None else jax.tree.map(lambda _: 0, params)
        return jax.tree.map(lambda p, k: k, params, axes)

    def decay_mask(params):
        mask = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
        mask = jax.tree.map(lambda _: True, params) if mask is None else mask
        return jax.tree.map(lambda p, keep: bool(keep) and weight_decay > 0, params, mask)

    def init(params):
        for p in jax.tree.leaves(params):
            _check(jnp.asarray(p).dtype == jnp.float32, "parameter dtype", str(jnp.asarray(p).dtype),
                   "float32 (torch-exact Adam reproduces float32 parameters)")
        count = jax.tree.map(lambda p, k: jnp.zeros(p.shape[:k] + (1,) * (p.ndim - k), jnp.int32),
                             params, leaf_axes(params))
        return TorchAdamState(step=jnp.zeros((), jnp.int32), count=count, mu=jax.tree.map(jnp.zeros_like, params),
                              nu=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("torch_adam needs params: pass them to update(grads, state, params)")
        present = has_grad(grads) if has_grad is not None else jax.tree.map(lambda _: True, grads)
        decays = decay_mask(params)
        with jax.enable_x64(True):
            lr = _take_f64(lr_bits, state.step)
        decay_t = jnp.take(jnp.asarray(decay), state.step, mode="fill", fill_value=np.nan)

        def one(g, p, m, v, c, has, decayed):
            has = jnp.reshape(jnp.asarray(has), c.shape) if jnp.ndim(has) else jnp.asarray(has)
            c = jnp.where(has, c + 1, c)
            t = jnp.maximum(c, 1)
            bias2 = jnp.take(jnp.asarray(bias2_sqrt), t, mode="fill", fill_value=np.nan)
            with jax.enable_x64(True):
                neg_step = (-(lr / _take_f64(bias1_bits, t))).astype(jnp.float32)
                if decayed and not decoupled_weight_decay:
                    g = _fma(p, wd32, g)
                if lerp_w < 0.5:
                    m_new = _fma(lerp_w, g - m, m)
                else:
                    m_new = _fma(lerp_w - np.float32(1), g - m, g)
                v_new = _fma(_mul(one_minus_b2, g), g, _mul(v, beta2))
                denom = _div(_sqrt(v_new), bias2) + eps32
                step = _div(_mul(neg_step, m_new), denom)
            # -0.0 leaves every parameter without a gradient bit-identical (p + -0.0 == p, signed zeros too).
            increment = jnp.where(has, step, np.float32(-0.0))
            if decayed and decoupled_weight_decay:
                increment = DecayedIncrement(jnp.where(has, decay_t, np.float32(1)), increment)
            return increment, c, jnp.where(has, m_new, m), jnp.where(has, v_new, v)

        treedef = jax.tree.structure(params)
        columns = [treedef.flatten_up_to(tree) for tree in
                   (grads, params, state.mu, state.nu, state.count, present, decays)]
        increments, count, mu, nu = zip(*(one(*leaf) for leaf in zip(*columns)))
        new_state = TorchAdamState(step=state.step + 1, count=treedef.unflatten(count),
                                   mu=treedef.unflatten(mu), nu=treedef.unflatten(nu))
        return treedef.unflatten(increments), new_state

    return optax.GradientTransformation(init, update)


def torch_adamw(learning_rate: float | Schedule, *, total_steps: int, b1: float = 0.9, b2: float = 0.999,
                eps: float = 1e-8, weight_decay: float = 1e-2, **kwargs) -> optax.GradientTransformation:
    """torch.optim.AdamW: decoupled weight decay p *= 1 - lr*wd before the moments (torch's default wd 1e-2)."""
    return torch_adam(learning_rate, total_steps=total_steps, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      decoupled_weight_decay=True, **kwargs)


def torch_clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_'s formula: g *= min(1, max_norm * (1 / (norm + 1e-6))), always applied.

    The norm is summed in XLA's order, not torch's (per-tensor norms, then their norm), so it may differ in the
    last bits; the coefficient is formed as torch forms it (`max_norm / tensor` is reciprocal times max_norm).
    """
    _check(max_norm > 0, "max_norm", max_norm, "> 0")
    max_norm32 = np.float32(max_norm)

    def update(grads, state, params=None):
        del params
        norm = optax.tree.norm(grads)
        coef = jnp.minimum((1 / (norm + np.float32(1e-6))) * max_norm32, np.float32(1))
        return jax.tree.map(lambda g: g * coef, grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def apply_updates(params, updates):
    """params + updates, with `DecayedIncrement` leaves applied as torch applies them (exact); dtype kept.

    For plain increments this is optax.apply_updates.
    """
    def apply(p, u):
        if isinstance(u, DecayedIncrement):
            with jax.enable_x64(True):
                return _add(_mul(p, u.decay), u.increment)  # torch rounds p * decay on its own (mul_)
        return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)

    return jax.tree.map(apply, params, updates, is_leaf=lambda x: isinstance(x, DecayedIncrement))
