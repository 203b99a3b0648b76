"""Where envelopes are written: a per-thread copy of the app's result backend class with
:class:`EnvelopeBackendMixin` mixed in, used only by throttled tasks (every other task keeps the
app's backend untouched). It runs wherever an envelope is written: the pool, the worker's main
process (tasks that never run, lost workers), a caller cancelling an errgroup.

Stored so that a client without this package reads them without a decoding error:

* ok: state ``SUCCESS``, ``result`` is the plain JSON value, as for any task;
* failed: state ``FAILURE``, ``result`` is an ordinary ``celery.exceptions.TaskError`` whose
  message reads ``[kind] dotted.Type: message``; revoked tasks keep Celery's ``REVOKED``;
* either way the envelope's details ride beside them in the result meta, under ``envelope``.

A task is *settled* once its envelope is written, exactly once: a second report of the same end
(Celery reports a hard time limit twice) is dropped. Each settle is then announced to
:data:`settled_listeners` with ``(app, request, task_id, ok)``, in this process. The listeners are
registered in one place, :mod:`celery_throttled.errgroup` (an errgroup counts its members and
cancels on the first failure); this module knows nothing of them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import states
from celery.app.backends import by_url
from celery.exceptions import TaskError as CeleryTaskError

from .. import request as protocol
from ..envelope import ErrorInfo, dotted_name, error_for
from ..errors import Cancelled, TaskFailed

__all__ = ["EnvelopeBackendMixin", "details_of", "envelope_backend", "settled_listeners"]

logger = logging.getLogger(__name__)
_local = threading.local()

#: called with ``(app, request, task_id, ok)`` after each envelope is written
SettledListener = Callable[[Any, Any, str, bool], None]
settled_listeners: list[SettledListener] = []


class EnvelopeBackendMixin:
    """Mixed into the app's result backend class for throttled tasks' writes.

    After each envelope is written, every :data:`settled_listeners` entry hears of it.
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
        cancelled = None if request is None else protocol.CANCELLED.get(request)
        if cancelled:  # stopped by its errgroup's cancellation (terminate=True)
            meta = self.get_task_meta(task_id, cache=False)  # type: ignore[attr-defined]
            if meta.get("status") in states.READY_STATES:
                return None  # it ended just before it was stopped: its own envelope stands
            error = ErrorInfo("cancelled", dotted_name(Cancelled), str(cancelled))
            return self.mark_as_failure(task_id, TaskFailed(error.to_json()), request=request)
        if request is not None and protocol.SETTLED.get(request):
            return None
        if request is not None:
            protocol.SETTLED.set(request, True)
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
        if request is not None and protocol.SETTLED.get(request):
            # Celery reports a hard time limit twice (then as a lost worker): keep the first.
            return None
        error = error_for(exc)
        if request is not None:
            protocol.SETTLED.set(request, True)
            details = dict(protocol.ENVELOPE.get(request) or details_of(request))
            details["error"] = error.to_json()
            details["ok"] = False
            protocol.ENVELOPE.set(request, details)
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
        details = None if request is None else protocol.ENVELOPE.get(request)
        if details:
            meta["envelope"] = details
        return meta


def _settled(backend: Any, request: Any, task_id: str, ok: bool) -> None:
    """Announce the written envelope; a listener's failure is logged, never raised into Celery."""
    if request is None:
        return
    for listener in settled_listeners:
        try:
            listener(backend.app, request, task_id, ok)
        except Exception:
            logger.exception(
                "celery-throttled: a listener of settled envelopes failed for task %s", task_id
            )


def details_of(request: Any, task_name: str | None = None) -> dict[str, Any]:
    """The envelope's details known from the request alone; its run adds its times."""
    throttle = protocol.info(request)
    return {
        "task_name": task_name or getattr(request, "task", None),
        "key": throttle.get("key"),
        "worker": getattr(request, "hostname", None),
        "attempts": int(getattr(request, "retries", 0) or 0) + 1,
        "waited": throttle.get("waited"),
        "trace_id": throttle.get("trace_id"),
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
