"""Who waits, who is rejected, and what happens after a failure: the task's policies.

Wait policies (applied by the gate, before the task runs; a rejected task never runs, settles
as a ``rejected`` envelope and its message is acknowledged):

* ``on_full="wait"`` (default): wait for a slot, for as long as ``max_wait`` allows.
* ``on_full="reject"``: no slot free right now → rejected at once (ants' Nonblocking).
* ``max_wait=S``: a task that has waited S seconds for a slot is rejected (waited too long).

Waiting never consumes a retry.

Failure policies (applied where the task runs):

* retry: ``retry=RetryPolicy(max_attempts=3, on=(IOError,), backoff=1.0)``, built on Celery's
  ``autoretry_for``: each retry is a new message, so the slot is released while the retry waits
  out its backoff; the envelope counts ``attempts``. The backoff is the policy's own
  (:meth:`RetryPolicy.delay`, in seconds, fractions kept): Celery's ``retry_backoff`` takes
  whole seconds only (0.5 becomes 1, a ``backoff_max`` under 1 becomes no backoff at all).
* degrade: ``fallback=f(error, *args, **kwargs)`` gives a value when the task fails; the
  envelope is ok, ``degraded=True``, and keeps the original ``error``. Failures the worker sees
  from outside the task (a lost process, a hard timeout) are not degraded.
* drop: the default, a failed envelope.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

__all__ = ["ON_FULL", "RetryPolicy", "validate_wait"]

ON_FULL = ("wait", "reject")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry the exceptions in ``on``, up to ``max_attempts`` runs in all.

    ``backoff``: seconds before the first retry, doubling each time (Celery's
    ``retry_backoff``), capped at ``backoff_max``; ``jitter`` randomises it as Celery does.
    """

    max_attempts: int = 3
    on: tuple[type[BaseException], ...] = (Exception,)
    backoff: float = 1.0
    backoff_max: float = 600.0
    jitter: bool = True

    def celery_options(self, task_name: str) -> dict[str, Any]:
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or (self.max_attempts < 1)
        ):
            raise ConfigurationError(
                f"task {task_name!r}: RetryPolicy.max_attempts must be an int >= 1, "
                f"got {self.max_attempts!r}"
            )
        if not self.on or not all(
            isinstance(exc, type) and issubclass(exc, BaseException) for exc in self.on
        ):
            raise ConfigurationError(
                f"task {task_name!r}: RetryPolicy.on must be exception classes, got {self.on!r}"
            )
        if self.backoff < 0 or self.backoff_max < 0:
            raise ConfigurationError(
                f"task {task_name!r}: RetryPolicy backoff values must be >= 0, got "
                f"{self.backoff!r} / {self.backoff_max!r}"
            )
        return {
            "autoretry_for": tuple(self.on),
            "max_retries": self.max_attempts - 1,
            # the countdown is the policy's (ThrottledTask.retry asks delay()), not Celery's
            "retry_backoff": False,
            "default_retry_delay": self.backoff,
        }

    def delay(self, retries: int) -> float:
        """Seconds before the retry that follows ``retries`` retries: ``backoff`` doubled each
        time, at most ``backoff_max``, and with ``jitter`` anywhere from 0 to that (full
        jitter, as Celery's)."""
        ceiling = min(self.backoff_max, self.backoff * 2**retries)
        return random.uniform(0, ceiling) if self.jitter else ceiling


def validate_wait(task_name: str, max_wait: Any, on_full: Any, fallback: Any) -> None:
    if max_wait is not None and (
        isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)) or max_wait <= 0
    ):
        raise ConfigurationError(
            f"task {task_name!r}: max_wait must be a positive number of seconds, got {max_wait!r}"
        )
    if on_full not in ON_FULL:
        raise ConfigurationError(
            f"task {task_name!r}: on_full must be one of {ON_FULL}, got {on_full!r}"
        )
    if fallback is not None and not callable(fallback):
        raise ConfigurationError(
            f"task {task_name!r}: fallback must be callable(error, *args, **kwargs), "
            f"got {fallback!r}"
        )
