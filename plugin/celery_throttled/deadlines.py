"""Caller-owned deadlines: normalised to an epoch timestamp that travels in a message header.

``apply_async(..., deadline=30)`` means thirty seconds from now; ``deadline=<aware datetime>``
is taken as is. The header ``throttle_deadline`` (:data:`.request.DEADLINE`) carries the epoch
seconds (JSON number).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from . import request as protocol
from .errors import ConfigurationError

__all__ = ["absolute", "arm", "passed", "soft_limit"]


def absolute(task_name: str, deadline: Any) -> float | None:
    if deadline is None:
        return None
    if isinstance(deadline, datetime):
        if deadline.tzinfo is None:
            raise ConfigurationError(
                f"task {task_name!r}: deadline must be an aware datetime or seconds, got the "
                f"naive datetime {deadline!r}"
            )
        return deadline.timestamp()
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or deadline <= 0:
        raise ConfigurationError(
            f"task {task_name!r}: deadline must be a positive number of seconds or an aware "
            f"datetime, got {deadline!r}"
        )
    return time.time() + float(deadline)


def passed(request: Any) -> bool:
    """Whether the request's deadline, if it has one, has passed."""
    deadline = protocol.deadline(request)
    return deadline is not None and time.time() >= deadline


def soft_limit(soft: float | None, deadline: float, now: float) -> float:
    """The soft time limit of a run that must end by ``deadline``: the time left, or ``soft``
    when that comes sooner."""
    left = max(deadline - now, 0.001)
    return left if soft is None else min(soft, left)


def arm(req: Any) -> None:
    """The time left to a worker Request's deadline, if it has one, acts as its soft time
    limit (or its own soft limit, when that comes sooner)."""
    deadline = protocol.deadline(req)
    if deadline is not None:
        hard, soft = req.time_limits
        soft = soft_limit(soft or req.task.soft_time_limit, deadline, time.time())
        req.time_limits = (hard, soft)
