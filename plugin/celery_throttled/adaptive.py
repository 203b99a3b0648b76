"""Adaptive caps: ``@throttled_task(limit=Adaptive(initial=16, min=1, max=64))``.

The key's cap is one value in Redis (the meta field ``acap``) that every worker admits against
and that each run's outcome moves, atomically, in ``lua/adapt.lua``:

- a fresh key starts in *slow start* at ``ceil(initial / 8)`` (at least ``min``) and adds a
  half per success (1.5x each round trip) until it reaches ``initial`` or the first overload;
- an overload (:class:`~.errors.Overloaded`, :class:`~.errors.SlowDown`, or a type listed in
  ``on``) cuts it to 0.7 x the tasks then running (1 / 1.5 of them in slow start, which grew it
  1.5x in the last round trip), remembers that count as the *ceiling*, and
  only a task that started after the last cut can cut again (one cut per round trip, however
  many tasks fail together);
- a success adds ``1 / cap`` (one per round trip at full use), or ``1 / (16 x cap)`` within one
  of the last ceiling (a slow probe of the level that failed), and nothing when the key does not
  use its cap or the run started beside fewer running bodies than the cap (no growth without
  evidence: a holder admitted but not yet running is none);
- the body's latency, smoothed over the last few runs, against the key's own slow baseline:
  1.3x holds the cap, 2x trims it to 0.9x (and makes that the ceiling);
- :class:`~.errors.SlowDown` also pauses every admission on the key for ``retry_after``;
- ``celery throttle set`` pins the cap (the pin wins until ``reset``; the pause still holds).

``docs/guide/adaptive.md`` explains the constants. Runs report from the pool process
(:mod:`.pool.feedback`); this module only declares and classifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError, Overloaded, SlowDown

__all__ = ["Adaptive", "signal"]

#: what a fresh key starts at: ``ceil(initial / SLOW_START_DIVISOR)``, within the bounds
SLOW_START_DIVISOR = 8


@dataclass(frozen=True)
class Adaptive:
    """A cap that finds the downstream's capacity between ``min`` and ``max``.

    ``initial``: the first guess (slow start opens the cap up to it); ``on``: exception types
    that mean "overloaded" besides :class:`~.errors.Overloaded` (an HTTP client's 429/503
    error, say); one that carries a numeric ``retry_after`` attribute (seconds) counts as a
    :class:`~.errors.SlowDown`.
    """

    initial: int = 16
    min: int = 1
    max: int = 64
    on: Any = ()

    def checked(self, task: str) -> Adaptive:
        """This declaration validated for ``task`` (``on`` as a tuple); ConfigurationError."""
        for name in ("initial", "min", "max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"task {task!r}: Adaptive {name} must be a positive int, got {value!r}"
                )
        if self.min > self.max:
            raise ConfigurationError(
                f"task {task!r}: Adaptive min ({self.min!r}) must not exceed max ({self.max!r})"
            )
        if not self.min <= self.initial <= self.max:
            raise ConfigurationError(
                f"task {task!r}: Adaptive initial must be within min..max "
                f"({self.min}..{self.max}), got {self.initial!r}"
            )
        on = self.on if isinstance(self.on, (tuple, list)) else (self.on,)
        for exc in on:
            if not (isinstance(exc, type) and issubclass(exc, BaseException)):
                raise ConfigurationError(
                    f"task {task!r}: Adaptive on must be exception classes, got {exc!r}"
                )
        return Adaptive(self.initial, self.min, self.max, tuple(on))

    @property
    def start(self) -> int:
        """Where a fresh key's slow start begins."""
        return max(self.min, min(self.initial, math.ceil(self.initial / SLOW_START_DIVISOR)))

    def encode(self) -> str:
        """The spec token the lease scripts read (``a=<min>/<max>/<initial>``)."""
        return f"{self.min}/{self.max}/{self.initial}"

    def __str__(self) -> str:
        return f"adaptive {self.min}..{self.max} (initial {self.initial})"


def signal(adaptive: Adaptive, exc: BaseException | None) -> tuple[str, float] | None:
    """What a run's end tells the cap: ``("ok", 0)``, ``("overloaded", 0)``,
    ``("slowdown", retry_after seconds)``, or None (an ordinary failure says nothing)."""
    if exc is None:
        return "ok", 0.0
    if isinstance(exc, SlowDown):
        return "slowdown", exc.retry_after
    if isinstance(exc, Overloaded) or (adaptive.on and isinstance(exc, adaptive.on)):
        after = getattr(exc, "retry_after", None)
        if isinstance(after, (int, float)) and not isinstance(after, bool) and after > 0:
            return "slowdown", float(after)
        return "overloaded", 0.0
    return None
