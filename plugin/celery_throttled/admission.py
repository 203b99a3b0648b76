"""Admission beyond the cap: a rate, a family's total, priority, and the pending bound.

Declared on the task (``@throttled_task(rate=…, burst=…, total=…, family=…, weight=…,
max_pending=…)``), validated once at decoration, and carried to the lease scripts as a *spec*:
the cap argument of every script, extended with one token per rule::

    "<cap>[ r=<interval ms>/<burst>][ t=<total>][ w=<weight>][ p=<pending horizon ms>]
          [ a=<min>/<max>/<initial>][ n=<rank>][ f]"

(``a=``: an adaptive cap, :mod:`.adaptive`; the cap is then its ``initial``.) A plain ``"5"``
is a cap alone, as before. ``lua/admission.lua`` reads the spec; the cap, the
rate and the token are decided in the same script that grants the slot.

The rate is a GCRA (generic cell rate algorithm): one timestamp per key, the *theoretical
arrival time* (TAT). A start conforms when ``now >= TAT - (burst - 1) * interval``; it moves
the TAT one interval on. So ``burst`` starts may go at once after an idle spell, then one per
interval. A start late by less than one interval (a wake-up's latency) keeps the schedule, so
the next may follow it sooner than one interval; in any window of W seconds at most
``burst + ceil(rate * W)`` start (51 in any second at 50/s), all decided on Redis's clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .adaptive import Adaptive
from .errors import ConfigurationError, KeyFunctionError

__all__ = [
    "PRIORITY_RANGE",
    "UNCAPPED",
    "Admission",
    "Rate",
    "rank",
    "spec",
    "validate_priority",
]

#: the cap of a key whose task declares a rate or a family's total but no ``limit``
UNCAPPED = 1_000_000_000

#: Celery's priorities (``apply_async(priority=…)``, ``Task.priority``)
PRIORITY_RANGE = range(0, 10)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([smh]))?\s*$")


@dataclass(frozen=True)
class Rate:
    """``per_second`` starts per second, ``burst`` of them at once after an idle spell."""

    per_second: float
    burst: int = 1

    @classmethod
    def parse(cls, value: Any, burst: int = 1) -> Rate:
        """``"20/s"``, ``"100/m"``, ``"5/h"``, or a number (per second); ValueError otherwise."""
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, (int, float)):
            per_second = float(value)
        elif isinstance(value, str) and (match := _RATE.match(value)):
            per_second = float(match.group(1)) / _UNITS[match.group(2) or "s"]
        else:
            raise ValueError(value)
        if not per_second > 0 or per_second == float("inf"):
            raise ValueError(value)
        return cls(per_second, burst)

    @property
    def interval_ms(self) -> float:
        """Milliseconds between two starts at the full rate."""
        return 1000.0 / self.per_second

    def encode(self) -> str:
        """The form the scripts keep in a key's meta: ``<interval ms>/<burst>``."""
        return f"{self.interval_ms:.9g}/{self.burst}"

    @classmethod
    def decode(cls, text: str) -> Rate:
        interval, burst = text.split("/")
        return cls(1000.0 / float(interval), int(burst))

    def __str__(self) -> str:
        for unit, seconds in (("s", 1.0), ("m", 60.0), ("h", 3600.0)):
            count = self.per_second * seconds
            if count >= 1 - 1e-9:
                return f"{count:.6g}/{unit}"
        return f"{self.per_second * 3600:.6g}/h"


@dataclass(frozen=True)
class Admission:
    """What a task declares beyond its ``limit``."""

    rate: Rate | None = None
    #: the keys sharing ``total``: the task's name, or the ``family=`` several tasks name
    family: str | None = None
    total: int | None = None
    #: turns in a row a key takes in its family's round robin: an int, or a callable of the
    #: task's arguments (resolved per run by :meth:`for_run`)
    weight: int | Callable[..., Any] | None = None
    max_pending: int | None = None
    #: seconds a worker's vouching keeps a pending task counted (``throttle_pending_ttl``):
    #: set by the worker that files the task, not by the decorator
    pending_horizon: float | None = None
    #: an adaptive cap (``limit=Adaptive(...)``)
    adaptive: Adaptive | None = None

    def on_worker(self, pending_ttl: float) -> Admission:
        """These rules as a worker applies them, with its pending horizon."""
        if self.max_pending is None or self.pending_horizon == pending_ttl:
            return self
        return replace(self, pending_horizon=pending_ttl)

    def for_run(self, task: str, args: Any, kwargs: Any) -> Admission:
        """These rules for one run: a weight function applied to the run's arguments.

        Raises :class:`KeyFunctionError` (the task does not run) when the function raises or
        returns anything but a positive int.
        """
        if not callable(self.weight):
            return self
        try:
            weight = self.weight(*(args or ()), **(kwargs or {}))
        except Exception as exc:
            raise KeyFunctionError(
                f"task {task!r}: its weight function raised {type(exc).__name__}: {exc}; "
                "the task did not run"
            ) from exc
        if not _positive_int(weight):
            raise KeyFunctionError(
                f"task {task!r}: its weight function returned {weight!r}; a weight must be a "
                "positive int; the task did not run"
            )
        return replace(self, weight=weight)

    @property
    def needs_lease(self) -> bool:
        """True when a task without ``limit`` still goes through the lease scripts."""
        return self.rate is not None or self.total is not None or self.max_pending is not None

    @classmethod
    def declare(
        cls,
        task: str,
        limit: int | None,
        *,
        rate: Any = None,
        burst: Any = None,
        total: Any = None,
        family: Any = None,
        weight: Any = None,
        max_pending: Any = None,
        adaptive: Adaptive | None = None,
    ) -> Admission | None:
        """Validate the decorator's options; None when the task declares none of them."""
        parsed = None
        if burst is not None and rate is None:
            raise ConfigurationError(f"task {task!r}: burst needs a rate, got burst={burst!r}")
        if burst is not None and not _positive_int(burst):
            raise ConfigurationError(f"task {task!r}: burst must be a positive int, got {burst!r}")
        if rate is not None:
            try:
                parsed = Rate.parse(rate, 1 if burst is None else burst)
            except ValueError:
                raise ConfigurationError(
                    f"task {task!r}: rate must be a positive number per second or a string "
                    f"like '20/s', '100/m', '5/h', got {rate!r}"
                ) from None
        if total is not None and not _positive_int(total):
            raise ConfigurationError(f"task {task!r}: total must be a positive int, got {total!r}")
        if total is not None and limit is not None and total < limit:
            raise ConfigurationError(
                f"task {task!r}: total ({total!r}) must be at least limit ({limit!r})"
            )
        if family is not None:
            if total is None:
                raise ConfigurationError(
                    f"task {task!r}: family={family!r} needs total, the cap its keys share"
                )
            if not isinstance(family, str) or not family or "\x1f" in family or len(family) > 200:
                raise ConfigurationError(
                    f"task {task!r}: family must be a non-empty str of at most 200 characters, "
                    f"got {family!r}"
                )
        if weight is not None:
            if total is None:
                raise ConfigurationError(
                    f"task {task!r}: weight={weight!r} needs total: a weight is a key's share "
                    "of its family's turns"
                )
            if not callable(weight) and not _positive_int(weight):
                raise ConfigurationError(
                    f"task {task!r}: weight must be a positive int or a callable "
                    f"weight(*args, **kwargs) -> int, got {weight!r}"
                )
        if max_pending is not None and not _positive_int(max_pending):
            raise ConfigurationError(
                f"task {task!r}: max_pending must be a positive int, got {max_pending!r}"
            )
        if parsed is None and total is None and max_pending is None and adaptive is None:
            return None
        in_family = (family or task) if total is not None else None
        return cls(parsed, in_family, total, weight, max_pending, adaptive=adaptive)


def spec(
    cap: int,
    admission: Admission | None = None,
    *,
    rank: int | None = None,
    in_family: bool = False,
) -> str:
    """The cap argument of a lease script (see the module's docstring)."""
    parts = [str(cap)]
    if admission is not None:
        if admission.rate is not None:
            parts.append(f"r={admission.rate.encode()}")
        if admission.total is not None:
            parts.append(f"t={admission.total}")
        if isinstance(admission.weight, int) and admission.weight > 1:
            parts.append(f"w={admission.weight}")
        if admission.max_pending is not None and admission.pending_horizon:
            parts.append(f"p={int(admission.pending_horizon * 1000)}")
        if admission.adaptive is not None:
            parts.append(f"a={admission.adaptive.encode()}")
    if rank:
        parts.append(f"n={rank}")
    if in_family:
        parts.append("f")
    return " ".join(parts)


def validate_priority(task: str, priority: Any) -> None:
    """A priority outside Celery's range (0-9) is refused when the task is sent."""
    if priority is None:
        return
    valid = isinstance(priority, int) and not isinstance(priority, bool)
    if not valid or priority not in PRIORITY_RANGE:
        raise ConfigurationError(
            f"task {task!r}: priority must be an int from {PRIORITY_RANGE.start} to "
            f"{PRIORITY_RANGE.stop - 1}, got {priority!r}"
        )


def rank(priority: Any, highest_first: bool) -> int:
    """A waiter's place among priorities: lower ranks go first.

    On RabbitMQ (``highest_first``) 9 goes first; on Redis and the other virtual transports 0
    does. A message without a priority ranks as 0, as the broker itself treats it.
    """
    try:
        value = min(max(int(priority), PRIORITY_RANGE.start), PRIORITY_RANGE.stop - 1)
    except (TypeError, ValueError):
        value = 0
    return PRIORITY_RANGE.stop - 1 - value if highest_first else value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
