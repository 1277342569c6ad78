"""PyTorch state dicts <-> phase1-jax models and Orbax checkpoints (the `import-torch` / `export-torch` commands).

Model level: `model_from_state_dict` and `state_dict_from_model`. Checkpoint level: `import_torch` reads a torch
file, checks it strictly and writes an Orbax checkpoint, recording the torch layout in meta.json so that
`export_torch` writes back exactly the keys, order, shapes and dtypes it read.

Optimizer state (torch AdamW `state_dict()` <-> optax) belongs here too, next to the model functions: torch
keys an optimizer's per-parameter state by position in `model.parameters()`, which is the order of
`key_map(...).parameter_rows()`, and each row's transform converts `exp_avg`/`exp_avg_sq` like the weight.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from phase1_jax.checkpoint import load_checkpoint, read_meta, save_checkpoint
from phase1_jax.config import ModelConfig, RunConfig
from phase1_jax.models.common import split_model
from phase1_jax.models.resnet_bk import ResNetBK

from .key_map import abstract_model, key_map
from .layouts import LAYOUTS, PREFIXES, default_layout, detect_layout, infer_model_config
from .state_dict import load_state_into, state_from_module
from .torch_io import load_state_dict, save_state_dict


def model_from_state_dict(state: Mapping[str, np.ndarray], config: ModelConfig | None = None, *,
                          layout: str | None = None, **options: Any) -> ResNetBK:
    """A ResNetBK holding exactly the given torch weights. The layout is detected and the architecture read off
    the shapes unless given; `options` are `infer_model_config`'s (top_k, dropout, numerics, ...)."""
    layout = layout or detect_layout(state)
    config = config or infer_model_config(state, layout, **options)
    abstract = abstract_model(config)
    return load_state_into(abstract, state, key_map(abstract, PREFIXES[layout]))


def state_dict_from_model(model: ResNetBK, layout: str | None = None) -> "OrderedDict[str, np.ndarray]":
    """The torch state dict (keys, order, shapes, dtypes) of a ResNetBK in `layout` (default: baseline for a
    baseline model, phase1_jax for a Phase 1 model)."""
    layout = layout or default_layout(model.config)
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    return state_from_module(model, key_map(model, PREFIXES[layout]))


def import_torch(src: str | Path, out_dir: str | Path, *, allow_code: bool = False, overwrite: bool = False,
                 **options: Any) -> tuple[Path, ModelConfig, str]:
    """Reads a torch checkpoint, checks it strictly, and writes an Orbax checkpoint directory atomically."""
    state = load_state_dict(src, allow_code=allow_code)
    layout = detect_layout(state)
    config = infer_model_config(state, layout, **options)
    model = model_from_state_dict(state, config, layout=layout)
    _, params, buffers = split_model(model)
    path = save_checkpoint(out_dir, RunConfig(model=config), params, buffers, overwrite=overwrite,
                           extra_meta={"torch_layout": layout, "imported_from": str(Path(src).absolute())})
    return path, config, layout


def export_torch(ckpt_dir: str | Path, out: str | Path, *, fmt: str | None = None) -> Path:
    """Writes the checkpoint as a plain torch state dict (the layout it was imported from, if any)."""
    _, model = load_checkpoint(ckpt_dir)
    layout = read_meta(ckpt_dir).get("torch_layout")
    return save_state_dict(state_dict_from_model(model, layout), out, fmt=fmt)
