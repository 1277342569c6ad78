"""Small building blocks shared by the model files."""

from __future__ import annotations

import jax
from flax import nnx


class Buffer(nnx.Variable):
    """Non-trainable model state that belongs in checkpoints (the reference's registered buffers).

    Optimisers only see `nnx.Param`; a `Buffer` is carried through training unchanged unless the training
    step updates it on purpose (e.g. the MoE's scattering step counter).
    """


class RankState(nnx.Variable):
    """Traced, non-trainable curriculum state (the AR-SSM's current maximum rank).

    Kept as an array rather than a Python int so that changing it never triggers a recompilation.
    """


def split_model(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, buffers): the split used by training, checkpoints and converters.

    Any other variable type would be silently dropped from checkpoints, so it is refused.
    """
    graphdef, params, buffers, rest = nnx.split(module, nnx.Param, (Buffer, RankState), ...)
    if jax.tree_util.tree_leaves(rest):
        raise TypeError(f"{type(module).__name__} holds variables that are neither Param nor Buffer/RankState")
    return graphdef, params, buffers
