"""celery-throttled: cluster-wide concurrency caps, panic-safe result envelopes, timeouts on
every pool, caller-owned deadlines and fail-fast errgroups for Celery tasks."""

from __future__ import annotations

from .adaptive import Adaptive
from .context import TaskContext, current_context
from .envelope import Envelope, ErrorInfo, TaskError
from .errgroup import Errgroup, ErrgroupResult, errgroup
from .errors import (
    Backpressure,
    Cancelled,
    ConfigurationError,
    DeadlineExceeded,
    KeyFunctionError,
    Overloaded,
    Rejected,
    ResultTooLarge,
    SlowDown,
    ThrottleError,
    Unserializable,
)
from .policies import RetryPolicy
from .results import EnvelopeResult
from .status import KeyStatus, UnknownKey, inspect, reset_cap, set_cap, set_rate
from .task import ThrottledTask, throttled_task

__all__ = [
    "Adaptive",
    "Backpressure",
    "Cancelled",
    "ConfigurationError",
    "DeadlineExceeded",
    "Envelope",
    "EnvelopeResult",
    "Errgroup",
    "ErrgroupResult",
    "ErrorInfo",
    "KeyFunctionError",
    "KeyStatus",
    "Overloaded",
    "Rejected",
    "ResultTooLarge",
    "RetryPolicy",
    "SlowDown",
    "TaskContext",
    "TaskError",
    "ThrottleError",
    "ThrottledTask",
    "UnknownKey",
    "Unserializable",
    "current_context",
    "errgroup",
    "inspect",
    "reset_cap",
    "set_cap",
    "set_rate",
    "throttled_task",
]

__version__ = "0.1.0"
