"""Caller-owned deadlines: normalised to an epoch timestamp that travels in a message header.

``apply_async(..., deadline=30)`` means thirty seconds from now; ``deadline=<aware datetime>``
is taken as is. The header ``throttle_deadline`` (:data:`.request.DEADLINE`) carries the epoch
seconds (JSON number).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from .errors import ConfigurationError

__all__ = ["absolute"]


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
