"""The one dispatcher of the kernel ops (`bk_scan`, `ar_ssm_scan`, `lns_matmul`): implementation names, which of
them run here, what `implementation=None` means, and its one fallback.

Rules, the same for every op:
* An explicit name is validated first: an unknown one raises ValueError listing the allowed values, and "pallas"
  where the kernels cannot run raises PallasUnavailableError (a NotImplementedError) naming the alternatives. An
  explicit choice never falls back.
* None is the default: the op's CPU implementation on a CPU; "pallas" where the kernels run and take the inputs;
  otherwise the fallback ("xla"), with a warning once per (op, reason) on a GPU (`_pallas_backend.default_is_pallas`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from . import _pallas_backend

PALLAS = "pallas"
# Stack level of the fallback warning, counted from its warnings.warn: default_is_pallas, `_default`, `choose`, the
# op's entry point that called `choose`, and then the code that called that entry point.
_CALLER_OF_THE_OP = 5


@dataclasses.dataclass(frozen=True)
class Dispatcher:
    op: str
    # Every implementation the op has, "pallas" among them.
    implementations: tuple[str, ...]
    # The default on a CPU (for the BK scan the sequential lax.scan, much faster there than the parallel form).
    cpu_default: str = "xla"
    # What the default becomes where the Pallas kernels cannot run or cannot take the inputs.
    fallback: str = "xla"

    def __post_init__(self):
        if PALLAS not in self.implementations or not {self.cpu_default, self.fallback} <= set(self.implementations):
            raise ValueError(f"{self.op}: the implementations {self.implementations} must include 'pallas', the CPU "
                             f"default {self.cpu_default!r} and the fallback {self.fallback!r}")

    @property
    def choices(self) -> tuple[str | None, ...]:
        """The values `implementation=` accepts: None (the default), then every name."""
        return (None, *self.implementations)

    def available(self) -> tuple[str, ...]:
        """The implementations that can run here: all of them, less "pallas" without a CUDA GPU >= sm_80."""
        return tuple(name for name in self.implementations if name != PALLAS or _pallas_backend.available())

    def check(self, implementation: str | None) -> None:
        """Raise unless `implementation` is None or a name that can run here (see the module docstring)."""
        if implementation is not None and implementation not in self.implementations:
            raise ValueError(f"{self.op}: implementation={implementation!r} is not valid; allowed values: "
                             + ", ".join(map(repr, self.choices)))
        if implementation == PALLAS:
            others = [repr(name) for name in self.implementations if name != PALLAS]
            alternatives = others[0] if len(others) == 1 else ", ".join(others[:-1]) + " or " + others[-1]
            _pallas_backend.require(self.op, False, alternatives=alternatives)

    def _default(self, supports: Callable[[], tuple[bool, str]] | None) -> str:
        """The implementation None stands for here. `supports()` -> (ok, reason) says whether the Pallas kernel
        takes the inputs at hand (asked only on a GPU); without it every input is taken."""
        if jax.default_backend() == "cpu":
            return self.cpu_default
        supported = (True, "") if supports is None else supports()
        if _pallas_backend.default_is_pallas(self.op, supported, stacklevel=_CALLER_OF_THE_OP):
            return PALLAS
        return self.fallback

    def choose(self, implementation: str | None, supports: Callable[[], tuple[bool, str]] | None = None) -> str:
        """`check`, then the name to run: `implementation` itself, or the default for None."""
        self.check(implementation)
        return self._default(supports) if implementation is None else implementation
