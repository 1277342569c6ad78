"""PyTorch ResNet-BK state dict <-> phase1-jax model (baseline layout, REFERENCE_SPEC §1.3)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np
from flax import nnx

from phase1_jax.config import ModelConfig
from phase1_jax.models.resnet_bk import ResNetBK

from .nnx_bridge import load_state_into, state_from_module
from .state_dict import infer_baseline_config, model_key_map, stacked_shapes_for


def model_from_state_dict(state: Mapping[str, np.ndarray], config: ModelConfig | None = None,
                          **overrides) -> ResNetBK:
    """Builds a ResNetBK holding exactly the given reference weights (architecture inferred if not given)."""
    config = config or infer_baseline_config(state, **overrides)
    abstract = nnx.eval_shape(lambda: ResNetBK(config, rngs=nnx.Rngs(0)))
    return load_state_into(abstract, state, model_key_map(config), stacked_shapes_for(config))


def state_dict_from_model(model: ResNetBK) -> "OrderedDict[str, np.ndarray]":
    """The reference's state dict (keys, order, shapes, dtypes) for a baseline ResNetBK."""
    return state_from_module(model, model_key_map(model.config))
