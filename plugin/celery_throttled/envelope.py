"""The result envelope: every outcome of a throttled task as ``ok`` + ``value`` or ``error``.

An :class:`Envelope` is what ``AsyncResult.get()`` returns for a throttled task, whatever happened
in the worker. It is plain JSON on the wire (no pickle): ``Envelope.to_json()`` /
``Envelope.from_json()``; error types are carried as dotted names and are never imported.
"""

from __future__ import annotations

import traceback as tb
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from billiard.exceptions import WorkerLostError
from celery.exceptions import (
    SoftTimeLimitExceeded,
    TaskRevokedError,
    Terminated,
    TimeLimitExceeded,
)

from .errors import Cancelled, DeadlineExceeded, TaskFailed, ThrottleError, Unserializable

__all__ = ["KINDS", "Envelope", "ErrorInfo", "TaskError", "error_for", "kind_of"]

#: Every value ``ErrorInfo.kind`` can take.
KINDS = (
    "error",
    "soft_timeout",
    "hard_timeout",
    "deadline",
    "cancelled",
    "worker_lost",
    "unserializable",
    "rejected",
    "revoked",
)

_MAX_CAUSE_DEPTH = 5
_MAX_TEXT = 16_000


def dotted_name(cls: type) -> str:
    module = getattr(cls, "__module__", None) or "builtins"
    return f"{module}.{cls.__qualname__}"


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 15] + "… [truncated]"


def _safe_str(exc: BaseException) -> str:
    try:
        return _clip(str(exc))
    except Exception as inner:  # a __str__ that raises must not take the envelope down
        return f"<unprintable {type(exc).__name__}: __str__ raised {type(inner).__name__}>"


@dataclass(frozen=True)
class ErrorInfo:
    """Why a task did not produce a value. ``type`` is a dotted name, never imported."""

    kind: str
    type: str
    message: str
    traceback: str | None = None
    cause: ErrorInfo | None = None

    @classmethod
    def from_exception(
        cls, exc: BaseException, kind: str = "error", *, depth: int = 0
    ) -> ErrorInfo:
        trace = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
        chained = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        cause = None
        if chained is not None and depth < _MAX_CAUSE_DEPTH:
            cause = cls.from_exception(chained, "error", depth=depth + 1)
        return cls(kind, dotted_name(type(exc)), _safe_str(exc), _clip(trace) or None, cause)

    def summary(self) -> str:
        return f"[{self.kind}] {self.type}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "type": self.type,
            "message": self.message,
            "traceback": self.traceback,
            "cause": self.cause.to_json() if self.cause else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ErrorInfo:
        cause = data.get("cause")
        return cls(
            str(data.get("kind", "error")),
            str(data.get("type", "builtins.Exception")),
            str(data.get("message", "")),
            data.get("traceback"),
            cls.from_json(cause) if isinstance(cause, dict) else None,
        )


#: the kind of an exception wherever it is seen, first match wins
_KINDS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (DeadlineExceeded, "deadline"),
    (Cancelled, "cancelled"),
    (Unserializable, "unserializable"),
    (SoftTimeLimitExceeded, "soft_timeout"),
)
#: and of those Celery reports about a run from outside it; raised inside a task's body they
#: come from elsewhere (a child's result, say) and are plain errors of this run
_OUTSIDE_KINDS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (WorkerLostError, "worker_lost"),
    (TimeLimitExceeded, "hard_timeout"),
    ((Terminated, TaskRevokedError), "revoked"),
)


def kind_of(exc: BaseException, *, late: bool = False, outside: bool = False) -> str:
    """The envelope kind of ``exc``. ``late``: the caller's deadline has passed, so a soft time
    limit means the deadline. ``outside``: Celery reports ``exc`` about the run (a lost process,
    a time limit, a revoke) rather than the task's body raising it."""
    if isinstance(exc, TaskFailed):
        return str(exc.error.get("kind", "error"))
    if late and isinstance(exc, SoftTimeLimitExceeded):
        return "deadline"
    for types, kind in (*_KINDS, *(_OUTSIDE_KINDS if outside else ())):
        if isinstance(exc, types):
            return kind
    return "error"


def error_for(exc: BaseException) -> ErrorInfo:
    """The error of an exception that reached the backend without passing through the task's
    own run: a :class:`~.errors.TaskFailed` carries its finished error, others are classified."""
    if isinstance(exc, TaskFailed):
        return ErrorInfo.from_json(exc.error)
    return ErrorInfo.from_exception(exc, kind_of(exc, outside=True))


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _parse(moment: Any) -> datetime | None:
    if not moment:
        return None
    if isinstance(moment, datetime):
        return moment
    return datetime.fromisoformat(str(moment))


def utc_from_timestamp(stamp: float | None) -> datetime | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, tz=timezone.utc)


@dataclass(frozen=True)
class Envelope:
    """The outcome of one task run: the value when ``ok``, else ``error``.

    ``waited`` is the time spent waiting for a slot, ``runtime`` the time spent running, both
    in seconds; ``started_at`` and ``finished_at`` are aware UTC datetimes (``None`` when the
    task never started). ``attempts`` counts runs, retries included. ``trace_id`` is the
    OpenTelemetry trace of its wait for a slot (32 hex digits; :mod:`celery_throttled.tracing`),
    or ``None``.
    """

    ok: bool
    value: Any = None
    error: ErrorInfo | None = None
    task_id: str | None = None
    task_name: str | None = None
    key: str | None = None
    worker: str | None = None
    attempts: int = 1
    started_at: datetime | None = None
    finished_at: datetime | None = None
    runtime: float | None = None
    waited: float | None = None
    degraded: bool = False
    trace_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def unwrap(self) -> Any:
        """The value, or raise :class:`TaskError` carrying this envelope."""
        if self.ok:
            return self.value
        raise TaskError(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "value": self.value,
            "error": self.error.to_json() if self.error else None,
            "task_id": self.task_id,
            "task_name": self.task_name,
            "key": self.key,
            "worker": self.worker,
            "attempts": self.attempts,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "runtime": self.runtime,
            "waited": self.waited,
            "degraded": self.degraded,
            "trace_id": self.trace_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        error = data.get("error")
        return cls(
            ok=bool(data.get("ok")),
            value=data.get("value"),
            error=ErrorInfo.from_json(error) if isinstance(error, dict) else None,
            task_id=data.get("task_id"),
            task_name=data.get("task_name"),
            key=data.get("key"),
            worker=data.get("worker"),
            attempts=int(data.get("attempts") or 1),
            started_at=_parse(data.get("started_at")),
            finished_at=_parse(data.get("finished_at")),
            runtime=data.get("runtime"),
            waited=data.get("waited"),
            degraded=bool(data.get("degraded", False)),
            trace_id=data.get("trace_id"),
        )


class TaskError(ThrottleError):
    """Raised by :meth:`Envelope.unwrap` for a failed task; ``.envelope`` says what happened."""

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        error = envelope.error
        detail = error.summary() if error else "[error] unknown failure"
        super().__init__(f"task {envelope.task_name or '?'}[{envelope.task_id}] failed: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskError, (self.envelope,))
