"""Reading and writing PyTorch state dicts (.pt/.pth/.bin through torch.load, or .safetensors).

Tensors cross over as NumPy arrays; bfloat16 uses `ml_dtypes.bfloat16` (shipped with JAX), so values travel
bit for bit. Reading uses `torch.load(weights_only=True)`: a pickle that carries code is refused unless the
caller opts in explicitly. Writing is atomic (a temporary file renamed into place).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

KEY_ORDER_METADATA = "phase1_jax.key_order"
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")  # guide §5.1: training checkpoints nest the weights


class TorchCheckpointError(ValueError):
    """A torch checkpoint file could not be read as a plain state dict."""


def _torch():
    try:
        import torch
    except ImportError as err:  # torch is an optional extra
        raise TorchCheckpointError("reading or writing PyTorch checkpoints needs torch: "
                                   "pip install 'phase1-jax[torch]'") from err
    return torch


def tensor_to_numpy(tensor) -> np.ndarray:
    torch = _torch()
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.contiguous().numpy().copy()


def numpy_to_tensor(array: np.ndarray):
    torch = _torch()
    array = np.array(array, order="C")  # keeps 0-d tensors 0-d (np.ascontiguousarray would not)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _unwrap(obj, path: Path) -> Mapping:
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(hasattr(v, "shape") for v in inner.values()):
                return inner
        if obj and all(hasattr(v, "shape") for v in obj.values()):
            return obj
        kinds = {k: type(v).__name__ for k, v in list(obj.items())[:8]}
        raise TorchCheckpointError(f"{path}: no state dict found: expected a mapping of tensors, or one nested "
                                   f"under {', '.join(WRAPPER_KEYS)}; top-level entries are {kinds}")
    raise TorchCheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")


def load_state_dict(path: str | os.PathLike, *, allow_code: bool = False) -> "OrderedDict[str, np.ndarray]":
    """Reads a state dict (possibly wrapped in a training checkpoint) as ordered NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise TorchCheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as fh:
                order = json.loads((fh.metadata() or {}).get(KEY_ORDER_METADATA, "null")) or list(fh.keys())
                return OrderedDict((k, tensor_to_numpy(fh.get_tensor(k))) for k in order)
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise TorchCheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    torch = _torch()
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not allow_code)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        text = str(err)
        if "Weights only load failed" in text or "weights_only" in text:
            raise TorchCheckpointError(
                f"{path}: refusing to load a pickle that carries code (torch.load(weights_only=True) failed). "
                "Save a plain state dict instead: torch.save(model.state_dict(), 'weights.pt'), or "
                "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'). If you trust this "
                "file, pass --allow-pickle-code (allow_code=True).") from err
        raise TorchCheckpointError(f"{path}: not a readable torch checkpoint "
                                   f"(truncated or corrupt?): {type(err).__name__}: {err}") from err
    state = _unwrap(obj, path)
    out = OrderedDict()
    for key, value in state.items():
        if not hasattr(value, "detach"):
            raise TorchCheckpointError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
        out[key] = tensor_to_numpy(value)
    return out


def save_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike, *, fmt: str | None = None) -> Path:
    """Writes a plain state dict (torch.save or safetensors) atomically."""
    path = Path(path)
    fmt = fmt or ("safetensors" if path.suffix == ".safetensors" else "pt")
    if fmt not in ("pt", "safetensors"):
        raise TorchCheckpointError(f"format {fmt!r} is not supported; allowed: pt, safetensors")
    tensors = OrderedDict((k, numpy_to_tensor(v)) for k, v in state.items())
    if not path.parent.is_dir():
        raise TorchCheckpointError(f"cannot write {path}: directory {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    except OSError as err:
        raise TorchCheckpointError(f"cannot write {path}: {err}") from err
    os.close(fd)
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file
            # safetensors stores tensors by offset, not insertion order: keep the state dict's order in metadata.
            save_file(tensors, tmp, metadata={KEY_ORDER_METADATA: json.dumps(list(tensors))})
        else:
            _torch().save(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
