"""celery-throttled: cluster-wide concurrency caps for Celery tasks."""

from __future__ import annotations

from .errors import ConfigurationError, KeyFunctionError, ThrottleError
from .task import ThrottledTask, throttled_task

__all__ = [
    "ConfigurationError",
    "KeyFunctionError",
    "ThrottleError",
    "ThrottledTask",
    "throttled_task",
]

__version__ = "0.1.0"
