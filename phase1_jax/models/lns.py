"""`LNSLinear`: a linear layer whose inference path multiplies in the logarithmic number system (REFERENCE_SPEC §2.3).

Training (`inference=False`) is an ordinary `x @ kernel + bias`: LNS is inference-only (no meaningful gradient), and
a one-time warning per process says so. Inference (`inference=True`) converts x and the kernel to (log|.|, sign)
and calls `phase1_jax.kernels.lns_matmul` with the chosen algorithm; the bias is added linearly.

Differences from the reference, on purpose: zeros are exact (log 0 = -inf, sign 0) instead of log(|x| + 1e-8); the
max-log output takes the sign of its dominant term instead of a majority vote of sign products; the log-weights are
recomputed from the kernel inside the traced computation (one elementwise pass, never stale after an update)
rather than cached in buffers; and the LNS path actually runs (the reference always falls back to F.linear).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import InvalidConfigError
from ..kernels.lns_matmul import ALGORITHMS, IMPLEMENTATIONS, lns_matmul, to_lns

__all__ = ["LNSLinear"]

_training_warning_issued = False


def _warn_training_once() -> None:
    global _training_warning_issued
    if not _training_warning_issued:
        _training_warning_issued = True
        warnings.warn("LNSLinear is inference-only: with inference=False it runs a plain matmul "
                      "(LNS arithmetic has no usable gradient).", UserWarning, stacklevel=3)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_uniform(keys, in_features, out_features):
    """torch nn.Linear's init: Kaiming-uniform with a = sqrt(5) is U(+-1/sqrt(fan_in)); the bias uses the same bound.

    One vmapped draw over (kernel key, bias key), each array a prefix of its key's draw: a single random-number
    kernel to compile instead of two.
    """
    bound = 1.0 / in_features ** 0.5
    size = in_features * out_features
    draws = jax.vmap(lambda k: jax.random.uniform(k, (size,), jnp.float32, -bound, bound))(jnp.stack(keys))
    return draws[0].reshape(in_features, out_features), draws[1, :out_features]


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _lns_forward(x, kernel, bias, algorithm, implementation, block_k):
    # log-weights are derived here from the current kernel: one elementwise pass, never stale after an update.
    log_x, sign_x = to_lns(x.reshape(-1, kernel.shape[0]))
    log_w, sign_w = to_lns(kernel)
    y = lns_matmul(log_x, sign_x, log_w, sign_w, algorithm=algorithm, implementation=implementation,
                   block_k=block_k)
    y = y.reshape(*x.shape[:-1], kernel.shape[1]).astype(jnp.result_type(x.dtype, kernel.dtype))
    return y if bias is None else y + bias


class LNSLinear(nnx.Module):
    """y = x @ kernel + bias, with an LNS matmul when called with inference=True.

    Params: `kernel` (in_features, out_features) and `bias` (out_features,) (None without bias), both drawn from
    U(-1/sqrt(in), 1/sqrt(in)) like torch's nn.Linear (Kaiming-uniform with a = sqrt(5)).
    algorithm: "max_log" (dominant term only, an approximation) or "exact" (log-sum-exp, A @ B up to rounding).
    implementation / block_k: passed to `lns_matmul`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, algorithm: str = "max_log", *,
                 implementation: str | None = None, block_k: int | None = None, rngs: nnx.Rngs):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(name, value, "must be an int >= 1")
        if not isinstance(bias, bool):
            raise InvalidConfigError("bias", bias, "must be a bool")
        if algorithm not in ALGORITHMS:
            raise InvalidConfigError("algorithm", algorithm, f"must be one of {ALGORITHMS}")
        if implementation == "pallas" or implementation not in IMPLEMENTATIONS:
            raise InvalidConfigError("implementation", implementation,
                                     f"must be one of {tuple(i for i in IMPLEMENTATIONS if i != 'pallas')}")
        if block_k is not None and (isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 1):
            raise InvalidConfigError("block_k", block_k, "must be None (automatic) or an int >= 1")
        self.in_features = in_features
        self.out_features = out_features
        self.algorithm = algorithm
        self.implementation = implementation
        self.block_k = block_k
        # A bias key is drawn even without a bias, so the kernel does not depend on the flag.
        kernel, bias_value = _init_uniform((rngs.params(), rngs.params()), in_features, out_features)
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(bias_value) if bias else None

    def __call__(self, x: jax.Array, *, inference: bool) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in in_features={self.in_features}, got shape {x.shape}")
        kernel = self.kernel[...]
        if not inference:
            _warn_training_once()
            y = x @ kernel
            return y if self.bias is None else y + self.bias[...]
        bias = None if self.bias is None else self.bias[...]
        return _lns_forward(x, kernel, bias, self.algorithm, self.implementation, self.block_k)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, algorithm: str = "max_log", *,
                    implementation: str | None = None, block_k: int | None = None) -> "LNSLinear":
        """An LNSLinear with a copy of an `nnx.Linear`'s kernel (same (in, out) layout) and bias."""
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"from_linear expects an nnx.Linear, got {type(linear).__name__}")
        # Structure only (no random init); both values are copied in below.
        out = nnx.eval_shape(lambda: cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                         algorithm=algorithm, implementation=implementation, block_k=block_k,
                                         rngs=nnx.Rngs(0)))
        out.kernel.set_value(jnp.array(linear.kernel[...], jnp.float32))
        if linear.bias is not None:
            out.bias.set_value(jnp.array(linear.bias[...], jnp.float32))
        return out
