"""Exception types shared across phase1-jax.

The names follow the PyTorch reference (`src/models/phase1/errors.py`) so that code written against its
documentation catches the same things; the messages are our own.
"""

from __future__ import annotations

from typing import Any


class InvalidConfigError(ValueError):
    """A configuration field has a value that is not allowed."""

    def __init__(self, param_name: str, param_value: Any, reason: str):
        self.param_name = param_name
        self.param_value = param_value
        self.reason = reason
        super().__init__(f"Invalid configuration parameter: '{param_name}' = {param_value!r}: {reason}")


class NumericalInstabilityError(RuntimeError):
    """Non-finite or exploding values were detected in a component."""

    def __init__(self, component: str, diagnostics: dict[str, Any] | None = None):
        self.component = component
        self.diagnostics = dict(diagnostics or {})
        lines = [f"Numerical instability detected in {component}"]
        for key, value in self.diagnostics.items():
            lines.append(f"  {key}: {value:.6e}" if isinstance(value, float) else f"  {key}: {value}")
        super().__init__("\n".join(lines))


class VRAMExhaustedError(RuntimeError):
    """The accelerator ran out of memory; carries suggestions for a smaller footprint."""

    def __init__(self, current_mb: float, limit_mb: float, suggestions: list[str] | None = None):
        self.current_mb = float(current_mb)
        self.limit_mb = float(limit_mb)
        self.suggestions = list(suggestions or [])
        usage = f"{100.0 * self.current_mb / self.limit_mb:.1f}%" if self.limit_mb > 0 else "unknown"
        lines = [f"VRAM exhausted: {self.current_mb:.1f}MB / {self.limit_mb:.1f}MB", f"Usage: {usage}"]
        if self.suggestions:
            lines.append("Suggestions to reduce memory usage:")
            lines += [f"  {i}. {s}" for i, s in enumerate(self.suggestions, 1)]
        super().__init__("\n".join(lines))


class HardwareCompatibilityError(RuntimeError):
    """A requested implementation needs hardware or software that is not present."""

    def __init__(self, required: str, available: str, fallback: str | None = None):
        self.required = required
        self.available = available
        self.fallback = fallback
        tail = f"Fallback option: {fallback}" if fallback else "No fallback available."
        super().__init__(f"Hardware compatibility requirement not met. Required: {required}. "
                         f"Available: {available}. {tail}")


class InputValidationError(ValueError):
    """Model or data input (token ids, shapes, lengths) is not acceptable."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or written; nothing partial is left behind."""
