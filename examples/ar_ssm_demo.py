"""The AR-SSM layer alone (the guide's §3.2 and §10 `demo_ar_ssm.py`): its rank curriculum, its gates, the L1 term.

    python examples/ar_ssm_demo.py [--smoke] [--steps 300]

1. The rank curriculum: `rank_for_step` raises the active rank from min_rank to max_rank; the gates of masked-off
   ranks are exactly zero, and changing the rank never recompiles (the rank is traced state).
2. Training the layer on a toy causal task (predict a running mean of the input) with the gate L1 term added to
   the loss: the task error falls, and the L1 term drives gates towards zero (gate sparsity rises, effective rank
   falls) more with a larger `l1_regularization`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from phase1_jax.models.ar_ssm import AdaptiveRankSemiseparableLayer


def curriculum(layer: AdaptiveRankSemiseparableLayer, x: jax.Array, warmup: int) -> None:
    graphdef, _ = nnx.split(layer)
    jitted = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, return_gates=True)[1])

    def forward(layer, x):
        return jitted(nnx.state(layer), x)

    print(f"rank curriculum (min {layer.min_rank}, max {layer.max_rank}, warm-up {warmup} steps):")
    print(f"  {'step':>6s} {'rank':>5s} {'effective rank':>15s} {'gate sparsity':>14s} {'L1 term':>10s}  "
          f"nonzero gate columns")
    for step in (0, warmup // 4, warmup // 2, 3 * warmup // 4, warmup, 2 * warmup):
        rank = layer.update_rank_schedule(step, warmup)
        aux = forward(layer, x)
        live = int(jnp.sum(jnp.any(aux["gates"] != 0, axis=(0, 1))))
        print(f"  {step:6d} {rank:5d} {float(aux['effective_rank']):15.3f} {float(aux['gate_sparsity']):14.3f} "
              f"{float(aux['gate_l1_loss']):10.2e}  {live}")
    print(f"  compilations of the forward for all these ranks: {jitted._cache_size()} (the rank is traced state)")


def train(l1: float, steps: int, d_model: int, length: int, seed: int = 0) -> dict[str, float]:
    """Fits y_t = mean(x_0..x_t) W with the layer plus its L1 term; returns the final metrics."""
    layer = AdaptiveRankSemiseparableLayer(d_model, max_rank=16, min_rank=4, l1_regularization=l1,
                                           rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    w = jax.random.normal(key, (d_model, d_model)) / d_model ** 0.5
    optimizer = nnx.Optimizer(layer, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer, x):
        target = (jnp.cumsum(x, axis=1) / jnp.arange(1, x.shape[1] + 1)[None, :, None]) @ w

        def loss_fn(layer):
            y, aux = layer(x)
            mse = jnp.mean((y - target) ** 2)
            return mse + aux["gate_l1_loss"], (mse, aux)

        (_, (mse, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(layer)
        optimizer.update(layer, grads)
        return mse, aux

    for i in range(steps):
        x = jax.random.normal(jax.random.fold_in(key, i), (8, length, d_model))
        mse, aux = step(layer, optimizer, x)
        if i == 0:
            first = float(mse)
    return {"l1": l1, "first_mse": first, "final_mse": float(mse), "effective_rank": float(aux["effective_rank"]),
            "gate_sparsity": float(aux["gate_sparsity"]), "l1_term": float(aux["gate_l1_loss"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes: under a minute on a CPU")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    d_model, length, steps = (32, 32, 60) if args.smoke else (64, 128, args.steps)
    start = time.perf_counter()
    layer = AdaptiveRankSemiseparableLayer(d_model, max_rank=16, min_rank=4, rngs=nnx.Rngs(0))
    curriculum(layer, jax.random.normal(jax.random.key(0), (4, length, d_model)), warmup=100)
    print(f"\ntraining the layer on a running-mean task for {steps} steps, with and without a strong L1 term:")
    print(f"  {'l1':>8s} {'mse first':>10s} {'mse final':>10s} {'effective rank':>15s} {'gate sparsity':>14s}")
    for l1 in (0.0, 1e-3, 0.1):
        r = train(l1, steps, d_model, length)
        print(f"  {r['l1']:8.0e} {r['first_mse']:10.4f} {r['final_mse']:10.4f} {r['effective_rank']:15.3f} "
              f"{r['gate_sparsity']:14.3f}")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
