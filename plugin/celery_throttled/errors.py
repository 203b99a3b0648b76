"""Every exception the package raises derives from :class:`ThrottleError`."""

from __future__ import annotations

__all__ = [
    "Backpressure",
    "Cancelled",
    "ConfigurationError",
    "DeadlineExceeded",
    "KeyFunctionError",
    "Overloaded",
    "Rejected",
    "ResultTooLarge",
    "SlowDown",
    "TaskFailed",
    "ThrottleError",
    "Unserializable",
]


class ThrottleError(Exception):
    """Base class for every error raised by celery-throttled."""


class ConfigurationError(ThrottleError, ValueError):
    """A decorator argument or a ``throttle_*`` setting has a bad value.

    The message always names the task (or the setting) and the offending value.
    """


class KeyFunctionError(ThrottleError):
    """A task's key function raised, or returned something other than a non-empty string.

    The task does not run; it is recorded as failed with this error and the worker carries on.
    """


class Cancelled(ThrottleError):
    """Raised by ``current_context().check()`` once the task's cancellation was requested."""


class DeadlineExceeded(ThrottleError):
    """Raised by ``current_context().check()`` once the caller's deadline has passed."""


class TaskFailed(ThrottleError):
    """Carries a finished :class:`~.envelope.ErrorInfo` (as JSON) from the task to the backend.

    Raised inside the worker in place of whatever the task raised, so that every failure reaches
    Celery as an ordinary, picklable, JSON-describable exception.
    """

    def __init__(self, error: dict[str, object]) -> None:
        self.error = error
        super().__init__(f"[{error.get('kind')}] {error.get('type')}: {error.get('message')}")

    def __reduce__(self) -> tuple[object, ...]:
        return (TaskFailed, (self.error,))


class ResultTooLarge(ThrottleError):
    """A task returned a value larger than ``throttle_max_result_bytes`` once encoded."""


class Unserializable(ThrottleError):
    """The error type of an ``unserializable`` envelope: the task returned a value the result
    serializer cannot encode (for JSON: a set, bytes, an arbitrary object)."""


class Rejected(ThrottleError):
    """The error type of a ``rejected`` envelope: the task's wait policy refused it a slot."""


class Backpressure(ThrottleError):
    """``apply_async`` / ``delay`` refused a task: its key already has ``max_pending`` tasks
    submitted and not yet finished. Nothing was sent."""

    def __init__(self, task: str, key: str, pending: int, max_pending: int) -> None:
        self.task, self.key, self.pending, self.max_pending = task, key, pending, max_pending
        super().__init__(
            f"task {task!r}: key {key!r} already has {pending} tasks pending "
            f"(max_pending={max_pending}); this one was not submitted"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (Backpressure, (self.task, self.key, self.pending, self.max_pending))


class Overloaded(ThrottleError):
    """Raised by a task whose downstream said it is overloaded (a 503, a 429, a full queue).

    On a task with an adaptive cap (``limit=Adaptive(...)``) it cuts the key's cap; anywhere it
    is an ordinary failure: an envelope of kind ``error``, retried by a ``RetryPolicy`` that
    lists it.
    """


class SlowDown(Overloaded):
    """An :class:`Overloaded` that also says for how long to stop: ``retry_after`` seconds (an
    HTTP ``Retry-After``). An adaptive key admits nothing new for that long."""

    def __init__(self, message: str = "", *, retry_after: float) -> None:
        if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)):
            raise TypeError(
                f"SlowDown: retry_after must be a number of seconds, got {retry_after!r}"
            )
        self.retry_after = max(0.0, float(retry_after))
        super().__init__(message or f"slow down: retry after {self.retry_after:g}s")

    def __reduce__(self) -> tuple[object, ...]:
        return (_slow_down, (str(self), self.retry_after))


def _slow_down(message: str, retry_after: float) -> SlowDown:
    return SlowDown(message, retry_after=retry_after)
