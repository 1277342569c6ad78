"""Reference numerics multiply float32 at full precision whatever the global default; native models follow it.

conftest.py sets jax_default_matmul_precision = "highest" for the whole suite, which would hide what the
library computes by default (TF32 on GPUs). These tests set a low default inside a context and read the
precision of every matmul and convolution in the traced training computation, forward and backward.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.extend.core import jaxprs_in_params

from phase1_jax.config import ModelConfig
from phase1_jax.data import Batch
from phase1_jax.phase1_config import Phase1Config
from phase1_jax.train import build_model, loss_fn, split_model

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
BASE = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_seq=16, num_experts=2, dropout=0.1)
PHASE1 = BASE.replace(phase1=Phase1Config(htt_rank=4, ar_ssm_max_rank=4, ar_ssm_min_rank=2,
                                          use_gradient_checkpointing=True))


def _matmul_precisions(jaxpr) -> list:
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            out.append(eqn.params["precision"])
        for sub in jaxprs_in_params(eqn.params):
            out.extend(_matmul_precisions(sub))
    return out


def _training_precisions(config: ModelConfig) -> list:
    graphdef, params, buffers = split_model(build_model(config))
    ids = jnp.zeros((2, config.n_seq), jnp.int32)
    batch = Batch(inputs=ids, targets=ids)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    with jax.default_matmul_precision("bfloat16"):
        jaxpr = jax.make_jaxpr(lambda p: grad_fn(p, buffers, graphdef, batch, jax.random.key(0)))(params)
    return _matmul_precisions(jaxpr.jaxpr)


@pytest.mark.parametrize("config", [BASE, PHASE1], ids=["baseline", "phase1"])
def test_reference_numerics_force_full_precision_forward_and_backward(config):
    precisions = _training_precisions(config.replace(numerics="reference"))
    assert len(precisions) >= 12  # forward and backward matmuls of two blocks and the head
    assert all(p == HIGHEST for p in precisions), precisions


def test_native_numerics_keep_the_default_precision():
    precisions = _training_precisions(BASE)
    assert precisions and not any(p == HIGHEST for p in precisions), precisions
