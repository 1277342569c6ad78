"""Small building blocks shared by the model files."""

from __future__ import annotations

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
