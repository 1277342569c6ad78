"""phase1_jax.torch_optim against torch.optim itself: Adam and AdamW bit for bit, step after step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from phase1_jax.torch_optim import (DecayedIncrement, apply_updates, torch_adam, torch_adamw,
                                    torch_clip_by_global_norm)

SHAPES = {"matrix": (37, 19), "vector": (130,), "scalar": (), "stacked": (5, 3, 7)}


def _ieee_sqrt(self):
    return torch.from_numpy(np.array(np.sqrt(self.detach().numpy()), np.float32))


@pytest.fixture
def ieee_torch_sqrt(monkeypatch):
    """torch's float32 CPU sqrt is MKL's vector sqrt, not correctly rounded (see test_torch_cpu_sqrt_...)."""
    monkeypatch.setattr(torch.Tensor, "sqrt", _ieee_sqrt)


def _random(rng, shape, scale=1.0):
    return np.asarray(rng.standard_normal(shape) * scale, np.float32)


class Pair:
    """The same parameters in torch (one tensor per torch parameter) and in JAX, stepped with the same grads."""

    def __init__(self, tx, torch_opt_cls, rng, *, stacked_axes=0, lr_lambda=None, **torch_kwargs):
        self.params = {k: _random(rng, s) for k, s in SHAPES.items()}
        self.stacked_axes = stacked_axes
        # A stacked leaf is several torch tensors: one per leading index, as the MoE experts are.
        self.torch = {(k, i): torch.nn.Parameter(torch.from_numpy(v[i].copy()))
                      for k, v in self.params.items() for i in self._rows(k)}
        self.opt = torch_opt_cls(list(self.torch.values()), foreach=False, **torch_kwargs)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda) if lr_lambda else None
        self.tx = tx
        self.jax = {k: jnp.asarray(v) for k, v in self.params.items()}
        self.state = tx.init(self.jax)
        self.step_fn = jax.jit(self._step)

    def _split(self, key):
        return key == "stacked" and self.stacked_axes

    def _rows(self, key):
        return range(SHAPES[key][0]) if self._split(key) else [Ellipsis]

    def _step(self, params, state, grads):
        updates, state = self.tx.update(grads, state, params)
        return apply_updates(params, updates), state

    def step(self, grads, absent=()):
        """absent: (key, row) pairs that get no gradient this step (torch: .grad is None)."""
        for (k, i), p in self.torch.items():
            p.grad = None if (k, i) in absent else torch.from_numpy(np.array(grads[k][i], np.float32))
        self.opt.step()
        if self.sched:
            self.sched.step()
        zeroed = {k: v.copy() for k, v in grads.items()}
        for k, i in absent:
            zeroed[k][i] = 0.0
        self.jax, self.state = self.step_fn(self.jax, self.state, {k: jnp.asarray(v) for k, v in zeroed.items()})

    def torch_view(self, fn):
        out = {}
        for k, v in self.params.items():
            rows = [fn(self.torch[(k, i)]) for i in self._rows(k)]
            out[k] = np.stack(rows) if self._split(k) else rows[0]
        return out

    def mismatches(self):
        """Bit mismatches of parameters and both moments (NaN-safe: compares bit patterns)."""
        ours = {"param": self.jax, "exp_avg": self.state.mu, "exp_avg_sq": self.state.nu}
        theirs = {"param": self.torch_view(lambda p: p.detach().numpy())}
        for moment in ("exp_avg", "exp_avg_sq"):  # torch creates a tensor's state at its first gradient
            theirs[moment] = self.torch_view(lambda p: self.opt.state[p].get(moment, torch.zeros_like(p)).numpy())
        counts = {f"{what}.{k}": int((np.asarray(ours[what][k]).view(np.int32)
                                      != np.asarray(theirs[what][k]).view(np.int32)).sum())
                  for what in ours for k in SHAPES}
        return {name: n for name, n in counts.items() if n}


def _grads(rng):
    # Gradients over seven decades, as training produces them, so every branch of the arithmetic is exercised.
    return {k: _random(rng, s, 10.0 ** rng.uniform(-6, 1)) for k, s in SHAPES.items()}


@pytest.mark.parametrize("decoupled,weight_decay,lr,betas", [
    (True, 0.0, 3e-3, (0.9, 0.999)),
    (True, 0.1, 1e-3, (0.9, 0.999)),
    (True, 0.05, 3e-2, (0.3, 0.99)),  # 1 - b1 >= 0.5: torch's lerp takes its other branch
    (False, 0.0, 1e-3, (0.9, 0.999)),
    (False, 0.1, 3e-2, (0.8, 0.95)),
])
def test_bitwise_equal_to_torch_over_120_steps(ieee_torch_sqrt, decoupled, weight_decay, lr, betas):
    steps = 120
    rng = np.random.default_rng(1)
    make = torch_adamw if decoupled else torch_adam
    tx = make(lr, total_steps=steps, b1=betas[0], b2=betas[1], eps=1e-8, weight_decay=weight_decay)
    pair = Pair(tx, torch.optim.AdamW if decoupled else torch.optim.Adam, rng, lr=lr, betas=betas, eps=1e-8,
                weight_decay=weight_decay)
    for step in range(steps):
        pair.step(_grads(rng))
        assert not pair.mismatches(), f"step {step}: {pair.mismatches()}"


def test_bitwise_with_lambda_lr_and_parameters_without_gradients(ieee_torch_sqrt):
    """A warmup-cosine LambdaLR, and tensors (whole leaves and single stacked rows) skipped on random steps:
    torch leaves them, their moments and their step counts untouched; each keeps its own bias correction."""
    steps, base_lr = 100, 1e-2

    def lr_lambda(step):
        return step / 10 if step < 10 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))

    rng = np.random.default_rng(2)

    def has_grad(grads):  # as the training step tells them apart: a tensor without a gradient has zeros
        return {k: jnp.any(g.reshape(g.shape[0], -1) != 0, axis=1) if k == "stacked" else jnp.any(g != 0)
                for k, g in grads.items()}

    tx = torch_adamw(lambda s: base_lr * lr_lambda(s), total_steps=steps, weight_decay=0.1,
                     param_axes=lambda p: {k: int(k == "stacked") for k in p}, has_grad=has_grad)
    pair = Pair(tx, torch.optim.AdamW, rng, stacked_axes=1, lr_lambda=lr_lambda, lr=base_lr, weight_decay=0.1)
    candidates = [("matrix", Ellipsis), ("scalar", Ellipsis)] + [("stacked", i) for i in range(5)]
    for step in range(steps):
        pair.step(_grads(rng), {c for c in candidates if rng.random() < 0.3})
        assert not pair.mismatches(), f"step {step}: {pair.mismatches()}"
    counts = np.asarray(pair.state.count["stacked"]).reshape(-1)
    torch_counts = [int(pair.opt.state[pair.torch[("stacked", i)]].get("step", 0)) for i in range(5)]
    assert counts.tolist() == torch_counts and len(set(torch_counts)) > 1


def test_torch_cpu_sqrt_is_the_only_difference():
    """Unpatched torch on the CPU differs from this module only where MKL's sqrt differs from the IEEE one."""
    rng = np.random.default_rng(3)
    tx = torch_adamw(1e-3, total_steps=10, weight_decay=0.01)
    pair = Pair(tx, torch.optim.AdamW, rng, lr=1e-3, weight_decay=0.01)
    for _ in range(3):  # two steps in, the states differ only by the sqrt's effect on the parameters
        before = {k: np.asarray(v) for k, v in pair.jax.items()}
        for (k, i), p in pair.torch.items():  # resynchronise torch's parameters to ours
            p.data = torch.from_numpy(before[k].copy())
        pair.step(_grads(rng))
        mkl = pair.torch_view(lambda p: pair.opt.state[p]["exp_avg_sq"].sqrt().numpy())
        ieee = pair.torch_view(lambda p: np.sqrt(pair.opt.state[p]["exp_avg_sq"].numpy()))
        theirs = pair.torch_view(lambda p: p.detach().numpy())
        for k in SHAPES:
            differs = np.asarray(pair.jax[k]) != theirs[k]
            assert not np.any(differs & (mkl[k] == ieee[k])), k
            ulps = np.abs(np.asarray(pair.jax[k]).view(np.int32).astype(np.int64) - theirs[k].view(np.int32))
            assert ulps.max() <= 2, k


def test_updates_are_increments_and_decayed_leaves_need_apply_updates():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(3)}
    tx = torch_adamw(1e-3, total_steps=2, weight_decay=0.1, weight_decay_mask={"w": True, "b": False})
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert isinstance(updates["w"], DecayedIncrement) and not isinstance(updates["b"], DecayedIncrement)
    with pytest.raises((ValueError, TypeError)):
        optax.apply_updates(params, updates)
    new = apply_updates(params, updates)
    np.testing.assert_array_equal(np.asarray(new["b"]), np.asarray(params["b"] + updates["b"]))
    plain = {"x": jnp.arange(3.0)}
    assert jax.tree.map(np.array_equal, apply_updates(plain, plain), optax.apply_updates(plain, plain))["x"]


def test_steps_beyond_the_tables_are_nan_not_wrong():
    params = {"w": jnp.ones(4)}
    tx = torch_adam(1e-3, total_steps=2)
    state = tx.init(params)
    for step in range(3):
        updates, state = tx.update({"w": jnp.ones(4)}, state, params)
        params = apply_updates(params, updates)
        assert np.all(np.isnan(np.asarray(params["w"]))) == (step == 2)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=5, b1=1.0), "b1"),
    (dict(total_steps=5, eps=-1.0), "eps"),
    (dict(total_steps=5, weight_decay=-0.1), "weight_decay"),
])
def test_invalid_arguments_name_the_argument(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        torch_adam(1e-3, **kwargs)


def test_negative_scheduled_learning_rate_is_refused():
    with pytest.raises(ValueError, match="learning_rate"):
        torch_adam(lambda step: 1e-3 - step * 1e-3, total_steps=3)


def test_float32_parameters_only():
    with pytest.raises(ValueError, match="float32"):
        torch_adam(1e-3, total_steps=3).init({"w": jnp.ones(2, jnp.bfloat16)})


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_follows_torch_clip_grad_norm(max_norm):
    rng = np.random.default_rng(4)
    grads = {k: _random(rng, s) for k, s in SHAPES.items()}
    tensors = {k: torch.nn.Parameter(torch.zeros(s)) for k, s in SHAPES.items()}
    for k, p in tensors.items():
        p.grad = torch.from_numpy(np.array(grads[k]))
    torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm)
    clipped, _ = torch_clip_by_global_norm(max_norm).update({k: jnp.asarray(v) for k, v in grads.items()},
                                                             optax.EmptyState())
    for k in SHAPES:  # the norm is summed in another order: equal to a few ulp
        np.testing.assert_allclose(np.asarray(clipped[k]), tensors[k].grad.numpy(), rtol=1e-6, atol=0)
    if max_norm > 100:  # below the threshold torch multiplies by exactly 1
        assert all(np.array_equal(np.asarray(clipped[k]), grads[k]) for k in SHAPES)
