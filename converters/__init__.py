"""PyTorch state dicts <-> phase1-jax (installed as `phase1_jax.converters`; see README.md in this folder).

    key_map.py            per-module torch names and transforms (RULES); `key_map(module)` derives the map
    state_dict.py         strict state-dict check; torch-layout dicts <-> pure dicts <-> NNX modules
    layouts.py            torch layout detection and ModelConfig inference from tensor shapes
    torch_io.py           reading and writing .pt/.safetensors files (weights only, atomic writes)
    bridge.py             model <-> state dict, import-torch / export-torch
    phase1_conversion.py  baseline <-> Phase 1 surgery (JAX only), convert-to-phase1 / convert-from-phase1
    torch_twins.py        PyTorch twins of every exportable model
    golden.py             the golden-case runner (python -m phase1_jax.converters.golden)

Importing this package imports nothing; torch is needed only by torch_io, torch_twins and their callers.
"""
