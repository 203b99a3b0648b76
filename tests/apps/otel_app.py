"""A traced application for the tracing tests. In the worker (``worker_init``), Celery is
instrumented with OpenTelemetry and every finished span kept by the SDK's in-memory exporter;
a plain task returns them (run on a threads worker, so it reads the same process's exporter as
the worker's waiting line). Importing the module, as the test process does, changes nothing."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery, shared_task, signals
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from celery_throttled import throttled_task

app = Celery(
    "otel_app",
    broker="redis://127.0.0.1:1/0",
    backend="redis://127.0.0.1:1/0",
    set_as_current=False,
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)

exporter = InMemorySpanExporter()


@signals.worker_init.connect
def trace_this_worker(**_: Any) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument(tracer_provider=provider)


@throttled_task(limit=1, key="otel-api", name="otel.slow")
def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@throttled_task(limit=1, key="otel-api", on_full="reject", name="otel.impatient")
def impatient() -> str:
    return "ran"


@shared_task(name="otel.spans")
def spans() -> list[dict[str, Any]]:
    """Every span this worker process finished, as JSON."""
    out = []
    for span in exporter.get_finished_spans():
        context = span.get_span_context()
        assert context is not None
        out.append(
            {
                "name": span.name,
                "trace_id": trace.format_trace_id(context.trace_id),
                "span_id": trace.format_span_id(context.span_id),
                "parent_id": trace.format_span_id(span.parent.span_id) if span.parent else None,
                "attributes": dict(span.attributes or {}),
                "status": span.status.status_code.name,
            }
        )
    return out
