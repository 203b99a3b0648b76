"""Where envelopes are written (the worker's result backend) and read back (``AsyncResult``).

Stored so that a client without this package reads them without a decoding error:

* ok: state ``SUCCESS``, ``result`` is the plain JSON value, as for any task;
* failed: state ``FAILURE``, ``result`` is an ordinary ``celery.exceptions.TaskError`` whose
  message reads ``[kind] dotted.Type: message``; revoked tasks keep Celery's ``REVOKED``;
* either way the envelope's details ride beside them in the result meta, under ``envelope``.

Writes go through a per-thread copy of the app's result backend class with
:class:`EnvelopeBackendMixin` mixed in, used only by throttled tasks; every other task keeps the
app's backend untouched.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import states
from celery.app.backends import by_url
from celery.exceptions import (
    SoftTimeLimitExceeded,
    TaskRevokedError,
    Terminated,
    TimeLimitExceeded,
)
from celery.exceptions import TaskError as CeleryTaskError
from celery.result import AsyncResult, EagerResult

from . import cancellation
from .envelope import Envelope, ErrorInfo, dotted_name
from .errors import Cancelled, TaskFailed

__all__ = ["EagerEnvelopeResult", "EnvelopeBackendMixin", "EnvelopeResult", "envelope_backend"]

logger = logging.getLogger(__name__)
_local = threading.local()


def error_for(exc: BaseException) -> ErrorInfo:
    """Classify an exception that reached the backend without passing through the task."""
    if isinstance(exc, TaskFailed):
        return ErrorInfo.from_json(exc.error)
    if isinstance(exc, WorkerLostError):
        kind = "worker_lost"
    elif isinstance(exc, TimeLimitExceeded):
        kind = "hard_timeout"
    elif isinstance(exc, SoftTimeLimitExceeded):
        kind = "soft_timeout"
    elif isinstance(exc, (Terminated, TaskRevokedError)):
        kind = "revoked"
    else:
        kind = "error"
    return ErrorInfo.from_exception(exc, kind)


class EnvelopeBackendMixin:
    """Mixed into the app's result backend class for throttled tasks' writes.

    After each write, an errgroup member is counted by its group, and a task that did not
    succeed cancels the errgroups it started (:mod:`.cancellation`).
    """

    def mark_as_done(
        self,
        task_id: str,
        result: Any,
        request: Any = None,
        store_result: bool = True,
        state: str = states.SUCCESS,
    ) -> Any:
        stored = super().mark_as_done(  # type: ignore[misc]
            task_id, result, request, store_result, state
        )
        _settled(self, request, task_id, ok=True)
        return stored

    def mark_as_revoked(
        self,
        task_id: str,
        reason: str = "",
        request: Any = None,
        store_result: bool = True,
        state: str = states.REVOKED,
    ) -> Any:
        cancelled = getattr(request, "throttle_cancelled", None) if request is not None else None
        if cancelled:  # stopped by its errgroup's cancellation (terminate=True)
            meta = self.get_task_meta(task_id, cache=False)  # type: ignore[attr-defined]
            if meta.get("status") in states.READY_STATES:
                return None  # it ended just before it was stopped: its own envelope stands
            error = ErrorInfo("cancelled", dotted_name(Cancelled), str(cancelled))
            return self.mark_as_failure(task_id, TaskFailed(error.to_json()), request=request)
        if request is not None and getattr(request, "throttle_settled", False):
            return None
        if request is not None:
            request.throttle_settled = True
        stored = super().mark_as_revoked(  # type: ignore[misc]
            task_id, reason, request, store_result, state
        )
        _settled(self, request, task_id, ok=False)
        return stored

    def mark_as_failure(
        self,
        task_id: str,
        exc: BaseException,
        traceback: str | None = None,
        request: Any = None,
        store_result: bool = True,
        call_errbacks: bool = True,
        state: str = states.FAILURE,
    ) -> Any:
        if request is not None and getattr(request, "throttle_settled", False):
            # Celery reports a hard time limit twice (then as a lost worker): keep the first.
            return None
        error = error_for(exc)
        if request is not None:
            request.throttle_settled = True
            details = dict(getattr(request, "throttle_envelope", None) or _details(request))
            details["error"] = error.to_json()
            details["ok"] = False
            request.throttle_envelope = details
        stored = super().mark_as_failure(  # type: ignore[misc]
            task_id,
            CeleryTaskError(error.summary()),
            traceback or error.traceback,
            request,
            store_result,
            call_errbacks,
            state,
        )
        _settled(self, request, task_id, ok=False)
        return stored

    def _get_result_meta(
        self, result: Any, state: str, traceback: Any, request: Any, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        meta: dict[str, Any] = super()._get_result_meta(  # type: ignore[misc]
            result, state, traceback, request, *args, **kwargs
        )
        details = getattr(request, "throttle_envelope", None) if request is not None else None
        if details:
            meta["envelope"] = details
        return meta


def _settled(backend: Any, request: Any, task_id: str, ok: bool) -> None:
    """Tell the errgroup machinery; a failure there is logged, never raised into Celery."""
    if request is None:
        return
    try:
        group = cancellation.group_of(request)
        if group is not None:
            cancellation.member_settled(backend.app, group, task_id, ok)
        if not ok and getattr(request, "throttle", None):
            cancellation.task_failed(backend.app, task_id)
    except Exception:
        logger.exception("celery-throttled: errgroup bookkeeping failed for task %s", task_id)


def _details(request: Any) -> dict[str, Any]:
    """Envelope details known from the request alone (failures outside the task's own run)."""
    throttle = getattr(request, "throttle", None) or {}
    return {
        "task_name": getattr(request, "task", None),
        "key": throttle.get("key"),
        "worker": getattr(request, "hostname", None),
        "attempts": int(getattr(request, "retries", 0) or 0) + 1,
        "waited": throttle.get("waited"),
    }


def envelope_backend(app: Any) -> Any:
    """This thread's envelope-writing backend for ``app`` (made once per thread and app)."""
    cache: dict[int, Any] = getattr(_local, "backends", None) or {}
    _local.backends = cache
    backend = cache.get(id(app))
    if backend is None or backend.app is not app:
        cls, url = by_url(app.backend_cls or app.conf.result_backend, app.loader)
        if not issubclass(cls, EnvelopeBackendMixin):
            cls = type(f"Envelope{cls.__name__}", (EnvelopeBackendMixin, cls), {})
        backend = cache[id(app)] = cls(app=app, url=url)
    return backend


def envelope_from_meta(meta: dict[str, Any], task_id: str, task_name: str | None) -> Envelope:
    details = meta.get("envelope")
    status = meta.get("status")
    result = meta.get("result")
    base = Envelope.from_json(details) if isinstance(details, dict) else None
    name = (base.task_name if base else None) or task_name
    common: dict[str, Any] = {"task_id": task_id, "task_name": name}
    if status == states.SUCCESS:
        if base is None:
            return Envelope(ok=True, value=result, **common)
        return replace(base, ok=True, value=result, **common)
    if base is not None and base.error is not None:
        return replace(base, ok=False, value=None, **common)
    exc = result if isinstance(result, BaseException) else Exception(str(result))
    kind = "revoked" if status == states.REVOKED else "error"
    error = error_for(exc) if kind == "error" else ErrorInfo.from_exception(exc, kind)
    if base is not None:
        return replace(base, ok=False, value=None, error=error, **common)
    return Envelope(ok=False, error=error, **common)


class EnvelopeResult(AsyncResult):  # type: ignore[misc]
    """``get()`` returns an :class:`Envelope` and never raises because the task failed.

    Only Celery's own ``TimeoutError`` escapes, when the caller's wait runs out.
    """

    def get(self, timeout: float | None = None, propagate: bool = True, **kwargs: Any) -> Any:
        super().get(timeout=timeout, propagate=False, **kwargs)
        return self.envelope()

    def envelope(self) -> Envelope:
        meta = self._cache if self._cache else self._get_task_meta()
        return envelope_from_meta(meta, self.id, getattr(self, "name", None))


class EagerEnvelopeResult(EagerResult):  # type: ignore[misc]
    """The eager-mode counterpart: the task ran inline; ``get()`` returns its envelope."""

    def get(self, timeout: float | None = None, propagate: bool = True, **kwargs: Any) -> Any:
        return self.envelope()

    def envelope(self) -> Envelope:
        meta = {"status": self.state, "result": self.result}
        details = getattr(self, "throttle_envelope", None)
        if details:
            meta["envelope"] = details
        return envelope_from_meta(meta, self.id, self.name)
