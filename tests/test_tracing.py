"""OpenTelemetry: the wait for a slot is a span on the task's trace, with its key, cap, time
waited and outcome, and the envelope carries the trace id; without OpenTelemetry nothing is
imported and nothing changes. Real threads workers (the waiting line and the span exporter
live in the worker's main process), the SDK's in-memory exporter inside them."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_throttled.request import DEADLINE
from celery_throttled.results import EnvelopeResult
from celery_throttled.testing import ConcurrencyProbe, WorkerFactory, assert_envelope, wait_until

pytest.importorskip("opentelemetry.sdk", reason="the tracing tests need opentelemetry-sdk")

pytestmark = pytest.mark.timeout(240)
APP = "tests.apps.otel_app"


def client_trace() -> tuple[str, str, dict[str, str]]:
    """A caller's span (on a provider of its own, never the global one), and the headers that
    carry its context, as opentelemetry-instrumentation-celery writes them when publishing."""
    from opentelemetry import propagate, trace
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("caller")
    with tracer.start_as_current_span("caller") as span:
        headers: dict[str, str] = {}
        propagate.inject(headers)
    context = span.get_span_context()
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id), headers


def send(app: Celery, name: str, args: tuple[Any, ...] = (), **options: Any) -> EnvelopeResult:
    result = app.send_task(name, args, **options)
    return EnvelopeResult(result.id, app=app, backend=app.backend)


def wait_spans(app: Celery, task_id: str) -> list[dict[str, Any]]:
    spans = app.send_task("otel.spans").get(timeout=30)
    return [
        s
        for s in spans
        if s["name"] == "celery_throttled.wait"
        and s["attributes"].get("messaging.message.id") == task_id
    ]


def test_the_wait_is_a_span_on_the_tasks_trace(throttle_worker: WorkerFactory):
    """Given a traced threads worker and two callers, each with a trace of its own, when both
    send a task capped at 1, then each task's wait is one span in its caller's trace, a child
    of the caller's span, naming the key, the cap, the outcome "admitted" and the same time
    waited as the envelope; the task's run span is in that trace too, and each envelope carries
    its trace id. Catches a wait span on a trace of its own, a missing attribute, or an
    envelope without the trace id."""
    throttle_worker(APP, pool="threads", concurrency=4)
    app = throttle_worker.app
    callers = [client_trace() for _ in range(2)]
    results = [send(app, "otel.slow", (0.4,), headers=headers) for _, _, headers in callers]
    envelopes = [assert_envelope(r.get(timeout=60), ok=True) for r in results]
    waits = []
    for (trace_id, span_id, _), result, env in zip(callers, results, envelopes, strict=True):
        assert env.trace_id == trace_id
        (span,) = wait_spans(app, result.id)
        assert (span["trace_id"], span["parent_id"]) == (trace_id, span_id)
        attributes = span["attributes"]
        assert attributes["celery_throttled.key"] == "otel-api"
        assert attributes["celery_throttled.cap"] == 1
        assert attributes["celery_throttled.outcome"] == "admitted"
        assert attributes["celery_throttled.waited"] == env.waited
        assert attributes["celery.task_name"] == "otel.slow"
        assert span["status"] == "UNSET"
        waits.append(env.waited)
        spans = app.send_task("otel.spans").get(timeout=30)
        assert any(s["name"] == "run/otel.slow" and s["trace_id"] == trace_id for s in spans)
    # one of the two waited for the other's slot
    assert max(w or 0.0 for w in waits) > 0


def test_rejected_and_late_waits_say_so(
    throttle_worker: WorkerFactory, throttle_probe: ConcurrencyProbe
):
    """Given a traced worker whose one slot of "otel-api" is taken, when a task that refuses to
    wait and one whose deadline passes while it waits are sent, then their envelopes say
    rejected and deadline, and so do their wait spans (status ERROR), each in its caller's
    trace."""
    throttle_worker(APP, pool="threads", concurrency=4)
    app = throttle_worker.app
    busy = send(app, "otel.slow", (2.0,))
    wait_until(lambda: throttle_probe.running("otel-api") == 1, 30, what="the slot to be taken")
    trace_r, _, headers_r = client_trace()
    trace_d, _, headers_d = client_trace()
    rejected = send(app, "otel.impatient", headers=headers_r)
    late = send(app, "otel.slow", (0.1,), headers=DEADLINE.into(headers_d, time.time() + 0.3))
    env_r = assert_envelope(rejected.get(timeout=60), kind="rejected")
    env_d = assert_envelope(late.get(timeout=60), kind="deadline")
    assert_envelope(busy.get(timeout=60), ok=True)
    for result, env, trace_id, outcome in (
        (rejected, env_r, trace_r, "rejected"),
        (late, env_d, trace_d, "deadline"),
    ):
        assert env.trace_id == trace_id
        (span,) = wait_spans(app, result.id)
        assert span["trace_id"] == trace_id
        assert span["attributes"]["celery_throttled.outcome"] == outcome
        assert span["status"] == "ERROR"


BLOCKER = '''
"""Makes opentelemetry look uninstalled, and never importable, in this interpreter."""
import sys


class _NoOpenTelemetry:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoOpenTelemetry())
'''


def test_without_opentelemetry_nothing_is_imported_and_nothing_changes(
    throttle_worker: WorkerFactory, throttle_prefix: str, tmp_path: Path
):
    """Given a worker in whose interpreter opentelemetry cannot be found (a meta-path finder
    refuses it, as an environment without it would) and, beside it, one where it can, when a
    throttled task runs on each with a caller's trace context in its headers, then on the first
    the envelope is ok with no trace id and no module of opentelemetry was imported in the
    worker's main process, where the waiting line runs; on the second (the control that shows
    the check can fail) opentelemetry was imported and the envelope names the caller's trace."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    path = os.pathsep.join([str(blocker), *(p for p in sys.path if p)])
    blocked_queue = f"{throttle_prefix}-blocked"
    throttle_worker(
        "tests.apps.plugin_app",
        pool="threads",
        concurrency=2,
        queues=[blocked_queue],
        env={"PYTHONPATH": path},
    )
    throttle_worker("tests.apps.plugin_app", pool="threads", concurrency=2)
    app = throttle_worker.app
    trace_id, _, headers = client_trace()
    blocked = send(app, "plugin.modules", ("opentelemetry",), headers=headers, queue=blocked_queue)
    env = assert_envelope(blocked.get(timeout=60), ok=True, value=[])
    assert env.trace_id is None
    assert env.to_json()["trace_id"] is None
    control = send(app, "plugin.modules", ("opentelemetry",), headers=headers)
    env = assert_envelope(control.get(timeout=60), ok=True)
    assert "opentelemetry.trace" in env.value
    assert env.trace_id == trace_id
