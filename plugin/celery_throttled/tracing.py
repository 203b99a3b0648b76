"""OpenTelemetry: the wait for a slot as a span on the task's trace, its trace id in the envelope.

Active only when ``opentelemetry-api`` is installed (``pip install 'celery-throttled[otel]'``).
Without it every function here returns at once and ``opentelemetry`` is never imported: this
module asks the import system whether the package exists (``importlib.util.find_spec``), and
imports it only then, at the first wait.

The span, started when a request reaches the worker's waiting line and ended when the wait
does::

    name        celery_throttled.wait                (kind INTERNAL)
    parent      the trace context the message carries (W3C ``traceparent`` in the task's
                headers, as opentelemetry-instrumentation-celery and ``propagate.inject``
                put it), else none: a trace of its own
    attributes  celery_throttled.key       the throttle key waited for
                celery_throttled.cap       the cap of that key
                celery_throttled.waited    seconds from arrival to the outcome
                celery_throttled.outcome   admitted | rejected | deadline | revoked | cancelled
                                           | handed_back
                celery.task_name, messaging.message.id   the task, as the instrumentation names it
    status      ERROR for rejected and deadline (the task will not run), else unset

An errgroup member with a group ``limit`` waits twice (the group's key, then its own), so it
has two such spans. The span's trace id is written into the request
(``throttle["trace_id"]``, 32 hex digits) and from there into the envelope (``trace_id``), so
a caller holding an envelope can find the trace. The worker exports spans through whatever
tracer provider the process configured; with none, the API's no-op provider still carries the
message's trace id into the envelope.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from . import deadlines
from . import request as protocol

__all__ = ["OUTCOMES", "Wait", "enabled", "wait_ended", "wait_released", "wait_started"]

#: every value of ``celery_throttled.outcome``
OUTCOMES = ("admitted", "rejected", "deadline", "revoked", "cancelled", "handed_back")
_FAILED = ("rejected", "deadline")
_state: dict[str, Any] = {}


def enabled() -> bool:
    """Whether ``opentelemetry-api`` is installed in this process (looked up once)."""
    found = _state.get("enabled")
    if found is None:
        try:
            found = importlib.util.find_spec("opentelemetry") is not None
        except (ImportError, ValueError):  # a finder that refuses it: as good as absent
            found = False
        _state["enabled"] = found
    return bool(found)


def _api() -> dict[str, Any]:
    """The OpenTelemetry names used here, imported once (only ever when :func:`enabled`)."""
    api = _state.get("api")
    if api is None:
        from opentelemetry import propagate, trace
        from opentelemetry.trace import Status, StatusCode

        api = _state["api"] = {
            "extract": propagate.extract,
            "tracer": trace.get_tracer("celery_throttled"),  # follows a provider set later
            "format": trace.format_trace_id,
            "internal": trace.SpanKind.INTERNAL,
            "error": lambda text: Status(StatusCode.ERROR, text),
            "provider": trace.get_tracer_provider,
            "no_op": (trace.ProxyTracerProvider, trace.NoOpTracerProvider),
            "current": trace.get_current_span,
        }
    return api


def _recording(api: dict[str, Any]) -> bool:
    """Whether a tracer provider that records spans is set (it can be set only once, so once
    seen it stays); until then the API's spans record nothing."""
    if _state.get("recording"):
        return True
    recording = not isinstance(api["provider"](), api["no_op"])
    _state["recording"] = recording
    return recording


class Wait:
    """One wait for a slot: its span and when it began."""

    __slots__ = ("ended", "span", "started")

    def __init__(self, span: Any) -> None:
        self.span = span
        self.started = time.monotonic()
        self.ended = False


def wait_started(req: Any, key: str, cap: int) -> Wait | None:
    """Open the wait's span under the message's trace context; note its trace id on ``req``."""
    if not enabled():
        return None
    api = _api()
    carrier = getattr(req, "_request_dict", None) or {}
    parent = api["extract"](carrier)
    if not _recording(api):  # the span would be the message's own context, recording nothing
        context = api["current"](parent).get_span_context()
        if context.is_valid:
            protocol.info(req)["trace_id"] = api["format"](context.trace_id)
        return None
    span = api["tracer"].start_span(
        "celery_throttled.wait",
        context=parent,
        kind=api["internal"],
        attributes={
            "celery_throttled.key": key,
            "celery_throttled.cap": cap,
            "celery.task_name": str(getattr(req, "name", "")),
            "messaging.message.id": str(getattr(req, "id", "")),
        },
    )
    context = span.get_span_context()
    if context.is_valid:
        protocol.info(req)["trace_id"] = api["format"](context.trace_id)
    return Wait(span)


def wait_ended(wait: Wait | None, outcome: str, waited: float | None = None) -> None:
    """Close the wait's span with its outcome (once; later calls do nothing)."""
    if wait is None or wait.ended:
        return
    wait.ended = True
    span = wait.span
    seconds = time.monotonic() - wait.started if waited is None else waited
    span.set_attribute("celery_throttled.waited", float(seconds))
    span.set_attribute("celery_throttled.outcome", outcome)
    if outcome in _FAILED:
        span.set_status(_api()["error"](f"{outcome} while waiting for a slot"))
    span.end()


def wait_released(wait: Wait | None, why: str, req: Any) -> None:
    """The request left the line without being admitted (or after: then nothing happens).

    ``why`` is one of :data:`OUTCOMES` when the gate knows it (``rejected``, ``cancelled``,
    ``handed_back``); otherwise the request was dropped for a passed deadline or a revocation.
    """
    if wait is None or wait.ended:
        return
    if why not in OUTCOMES:
        why = "deadline" if deadlines.passed(req) else "revoked"
    wait_ended(wait, why)
