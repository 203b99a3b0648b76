"""What happens where the task runs (pool process, thread, or the solo main thread).

:func:`run` wraps ``Task.__call__`` for throttled tasks:

1. ask the :data:`guards` whether it may run (an errgroup member whose group was cancelled may
   not), then enter the task's :class:`~.context.TaskContext` (deadline, cancellation);
2. on pools without Celery's own time limits (threads, solo) arm the watchdog;
3. run the task, and tell its adaptive cap how it went (:mod:`.feedback`);
4. check that the value is encodable by the result serializer and under
   ``throttle_max_result_bytes``;
5. turn *every* exception into :class:`~.errors.TaskFailed` carrying an
   :class:`~.envelope.ErrorInfo` (``SystemExit``, ``KeyboardInterrupt``, ``MemoryError`` and
   ``GeneratorExit`` included), so the pool and the worker survive whatever the task did, and the
   caller always gets an envelope. Celery's control-flow exceptions (``Retry``, ``Ignore``,
   ``Reject``) pass through untouched;
6. free its slots at once (:mod:`.release`), before Celery stores the result.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
import uuid
import weakref
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from billiard.common import terminate_handler_fired
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded
from kombu.exceptions import EncodeError
from kombu.serialization import dumps

from .. import context, deadlines
from .. import request as protocol
from ..envelope import ErrorInfo, kind_of, utc_from_timestamp
from ..errors import Cancelled, ResultTooLarge, TaskFailed, Unserializable
from ..settings import read_max_result_bytes
from . import feedback, release
from .backend import details_of
from .timeouts import watchdog

__all__ = ["Guard", "guards", "run"]

logger = logging.getLogger(__name__)

_PASS_THROUGH = (Retry, Ignore, Reject)
#: envelope details of eager runs, picked up by ``ThrottledTask.apply`` on the same thread
eager_details: dict[str, dict[str, Any]] = {}
_NATIVE_TIME_LIMITS = {"prefork", "processes"}
_DEADLINE_SLACK = 0.1  # a soft limit armed for the deadline may fire a little early

#: ``guard(task, request, ctx)``, asked before each run: it may raise ``Ignore`` (drop the run,
#: write nothing) or ``TaskFailed`` (settle it with that error without running), or arm ``ctx``
Guard = Callable[[Any, Any, context.TaskContext], None]
#: registered in one place, :mod:`celery_throttled.errgroup`
guards: list[Guard] = []


def run(task: Any, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    request = task.request
    ctx = context.TaskContext(task_id=request.id, deadline=protocol.deadline(request))
    try:
        for guard in guards:
            guard(task, request, ctx)
    except BaseException:  # it never runs: its slot is free at once all the same
        release.free(task, request, "failed", ran=False)
        raise
    outcome = "failed"
    try:
        value = _run(task, request, ctx, call, args, kwargs)
        outcome = "done"
        return value
    except Retry:
        outcome = "retried"
        raise
    except SystemExit:
        if terminate_handler_fired():
            outcome = ""  # the pool is terminating this process: the worker releases
        raise
    finally:
        if outcome:
            release.free(task, request, outcome)


def _run(
    task: Any,
    request: Any,
    ctx: context.TaskContext,
    call: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """The run, after its guards: the body, its checks, and every exception an envelope."""
    info = protocol.info(request)
    deadline = ctx.deadline
    feedback.started(task, request)
    started = time.time()
    details = details_of(request, task.name)
    details["started_at"] = _iso(started)
    protocol.ENVELOPE.set(request, details)
    if getattr(request, "is_eager", False):
        eager_details[request.id] = details
    timer = None
    pool = info.get("pool")
    if pool is not None and pool not in _NATIVE_TIME_LIMITS:
        soft, hard = _limits(task, request, deadline, started)
        if soft is not None or hard is not None:
            timer = watchdog.arm(soft, hard, _hard_reporter(task, request, details, hard))
    token = context.enter(ctx)
    try:
        try:
            value = call(*args, **kwargs)
            _check_result(task, value)
        finally:
            if timer is not None:
                timer.cancel()
    except _PASS_THROUGH as exc:
        _finish(details, started)
        feedback.report(task, request, exc, time.time() - started)
        raise
    except BaseException as exc:  # every panic becomes an envelope
        _finish(details, started)
        feedback.report(task, request, exc, time.time() - started)
        if isinstance(exc, SystemExit) and terminate_handler_fired():
            raise  # the pool is terminating this process (hard time limit, revoke): let it go
        if timer is not None and timer.hard_fired:
            raise Ignore() from None  # the caller already has its hard_timeout envelope
        error = ErrorInfo.from_exception(exc, _kind(exc, ctx))
        fallback = getattr(task, "throttle_fallback", None)
        if fallback is None or isinstance(exc, (TaskFailed, Cancelled)):
            raise TaskFailed(error.to_json()) from None
        return _degrade(task, fallback, error, details, args, kwargs)
    finally:
        context.leave(token)
    _finish(details, started)
    feedback.report(task, request, None, time.time() - started)
    if timer is not None and timer.hard_fired:
        raise Ignore()
    return value


def _degrade(
    task: Any,
    fallback: Any,
    error: ErrorInfo,
    details: dict[str, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """The task failed and has a fallback: its value stands in, the envelope says so."""
    try:
        value = fallback(error, *args, **kwargs)
        _check_result(task, value)
    except BaseException as exc:
        failed = ErrorInfo.from_exception(exc, _kind(exc, context.current_context()))
        failed = ErrorInfo(
            failed.kind,
            failed.type,
            f"the fallback failed too: {failed.message}",
            failed.traceback,
            error,
        )
        raise TaskFailed(failed.to_json()) from None
    details["degraded"] = True
    details["error"] = error.to_json()
    return value


def _kind(exc: BaseException, ctx: context.TaskContext) -> str:
    """The kind of what the task raised; a soft time limit at the deadline means the deadline."""
    late = ctx.deadline is not None and time.time() >= ctx.deadline - _DEADLINE_SLACK
    return kind_of(exc, late=late)


def _check_result(task: Any, value: Any) -> None:
    """Refuse what the result serializer cannot carry, and what is over the size cap.

    For the ``json`` serializer the check is strict JSON plus the few types kombu's JSON knows
    (datetime, date, time, Decimal, UUID): ``bytes`` are refused even though kombu would smuggle
    them through base64, since no other JSON client could read them back.
    """
    serializer, limit = _result_rules(task.app)
    try:
        if serializer == "json":
            data: bytes | str = json.dumps(value, default=_kombu_json_types)
        else:
            _, _, data = dumps(value, serializer=serializer)  # type: ignore[no-untyped-call]
    except (EncodeError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise Unserializable(
            f"task {task.name!r} returned a value of type {type(value).__name__} that the "
            f"{serializer!r} result serializer cannot encode: {exc}"
        ) from None
    if len(data) > limit:
        raise ResultTooLarge(
            f"task {task.name!r} returned {len(data)} bytes once encoded, over "
            f"throttle_max_result_bytes={limit}"
        )


_rules: weakref.WeakKeyDictionary[Any, tuple[str, int]] = weakref.WeakKeyDictionary()


def _result_rules(app: Any) -> tuple[str, int]:
    """The result serializer and ``throttle_max_result_bytes`` of ``app``, read once (the hot
    path would otherwise pay two Celery settings lookups per task)."""
    rules = _rules.get(app)
    if rules is None:
        rules = _rules[app] = (app.conf.result_serializer, read_max_result_bytes(app.conf))
    return rules


def _kombu_json_types(value: Any) -> str:
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time, Decimal, uuid.UUID)):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _limits(
    task: Any, request: Any, deadline: float | None, started: float
) -> tuple[float | None, float | None]:
    hard, soft = request.timelimit or (None, None)
    soft = soft or task.soft_time_limit
    hard = hard or task.time_limit
    if deadline is not None:
        soft = deadlines.soft_limit(soft, deadline, started)
    return soft, hard


def _hard_reporter(task: Any, request: Any, details: dict[str, Any], hard: float | None) -> Any:
    if hard is None:
        return None

    def report() -> None:
        logger.warning(
            "celery-throttled: %s[%s] passed its hard timeout (%ss) on a pool that cannot kill "
            "it; the caller got a hard_timeout envelope, the late outcome will be discarded and "
            "its slot stays taken until the code returns",
            task.name,
            request.id,
            hard,
        )
        details["finished_at"] = _iso(time.time())
        task.backend.mark_as_failure(request.id, TimeLimitExceeded(hard), request=request)

    return report


def _finish(details: dict[str, Any], started: float) -> None:
    finished = time.time()
    details["finished_at"] = _iso(finished)
    details["runtime"] = finished - started


def _iso(stamp: float) -> str:
    moment = utc_from_timestamp(stamp)
    assert moment is not None
    return moment.isoformat()
