"""`Phase1ErrorRecovery`: the training loop's recovery actions, offered from Python (the guide's §4.3).

    recovery = Phase1ErrorRecovery(max_recovery_attempts=3)
    try:
        state, metrics = step_fn(state, batch)
    except Exception as err:
        new_cfg = recovery.handle_vram_exhausted(err, train_cfg)      # None: not recoverable (re-raise)
        ...rebuild the step with new_cfg (same effective batch) and call it again

The reference's handlers flip flags on a mutable config and return True; configs here are frozen, so each handler
returns the changed config (or None when it cannot help), records a `RecoveryAction`, and never touches a live
model. The actions are the ones `phase1-jax train` takes by itself (`phase1_jax.trainer`):

* out of device memory: per-block rematerialisation, then gradient accumulation over twice the micro-batches
  (`MemoryPlan.escalate`), so the effective batch and the mathematics stay the same;
* numerical instability (what remains after the step's own skipping of non-finite and spiking updates): the
  learning rate times `lr_factor`, and, given a run's `TrainCheckpoints`, the newest intact state to go on from.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from .config import TrainConfig
from .errors import NumericalInstabilityError, VRAMExhaustedError
from .trainer import MemoryPlan, is_out_of_memory

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RecoveryAction:
    action_type: str
    timestamp: float
    success: bool
    details: dict[str, Any]


class Phase1ErrorRecovery:
    """Counts attempts per kind of failure (at most `max_recovery_attempts` each) and keeps a history."""

    def __init__(self, max_recovery_attempts: int = 3, enable_logging: bool = True, lr_factor: float = 0.5):
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must lie in (0, 1], got {lr_factor!r}")
        self.max_recovery_attempts = max_recovery_attempts
        self.enable_logging = enable_logging
        self.lr_factor = lr_factor
        self.vram_recovery_attempts = 0
        self.stability_recovery_attempts = 0
        self.history: list[RecoveryAction] = []

    def _record(self, action_type: str, success: bool, **details) -> None:
        self.history.append(RecoveryAction(action_type, time.time(), success, details))
        if self.enable_logging:
            logger.warning("recovery: %s (%s) %s", action_type, "ok" if success else "failed", details)

    def handle_vram_exhausted(self, error: BaseException, config: TrainConfig) -> TrainConfig | None:
        """The next memory plan for an out-of-memory `error` (XLA's RESOURCE_EXHAUSTED or VRAMExhaustedError):
        remat, then twice the micro-batches; None when the error is something else, the attempts are used up, or
        no smaller plan exists."""
        if not (isinstance(error, VRAMExhaustedError) or is_out_of_memory(error)):
            return None
        if self.vram_recovery_attempts >= self.max_recovery_attempts:
            return None
        self.vram_recovery_attempts += 1
        nxt = MemoryPlan(config.remat, config.micro_batches).escalate(config.batch_size)
        if nxt is None:
            self._record("vram_recovery_failed", False, remat=config.remat, micro_batches=config.micro_batches)
            return None
        kind = "enable_gradient_checkpointing" if nxt.remat != config.remat else "increase_micro_batches"
        self._record(kind, True, remat=nxt.remat, micro_batches=nxt.micro_batches)
        return dataclasses.replace(config, remat=nxt.remat, micro_batches=nxt.micro_batches)

    def handle_numerical_instability(self, error: BaseException, config: TrainConfig, *, checkpoints=None,
                                     state_like=None) -> tuple[TrainConfig, Any] | None:
        """(config with the learning rate times lr_factor, restored state or None) for a NumericalInstabilityError
        (or any error naming non-finite values); with `checkpoints` (a run's TrainCheckpoints) and `state_like`
        (a TrainState of the right structure) the newest intact checkpoint is restored too."""
        if not isinstance(error, (NumericalInstabilityError, FloatingPointError)):
            return None
        if self.stability_recovery_attempts >= self.max_recovery_attempts:
            return None
        self.stability_recovery_attempts += 1
        new = dataclasses.replace(config, learning_rate=config.learning_rate * self.lr_factor)
        state = None
        if checkpoints is not None and state_like is not None:
            step, state, _, _ = checkpoints.restore_latest(state_like)
            self._record("restore_checkpoint", True, step=step)
        self._record("reduce_learning_rate", True, old_lr=config.learning_rate, new_lr=new.learning_rate)
        return new, state

    def get_recovery_summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for action in self.history:
            kinds[action.action_type] = kinds.get(action.action_type, 0) + 1
        return {"vram_recovery_attempts": self.vram_recovery_attempts,
                "stability_recovery_attempts": self.stability_recovery_attempts,
                "successes": sum(a.success for a in self.history),
                "failures": sum(not a.success for a in self.history), "action_types": kinds,
                "history": [dataclasses.asdict(a) for a in self.history]}

    def reset_recovery_counters(self) -> None:
        self.vram_recovery_attempts = 0
        self.stability_recovery_attempts = 0
