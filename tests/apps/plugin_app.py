"""An application as a user writes it, for the pytest plugin's own tests: its settings name a
Redis that does not exist; the plugin's ``throttle_worker`` points it at the test's Redis."""

from __future__ import annotations

import time

from celery import Celery

from celery_throttled import throttled_task

app = Celery(
    "plugin_app",
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


@throttled_task(limit=2, key="plugin-api", name="plugin.capped")
def capped(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@throttled_task(limit=4, key="plugin-wide", name="plugin.wide")
def wide(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@throttled_task(limit=2, key="plugin-api", name="plugin.fails")
def fails(message: str) -> None:
    raise LookupError(message)


@throttled_task(limit=2, key="plugin-api", name="plugin.modules")
def modules(prefix: str) -> list[str]:
    """The modules this process has imported whose names start with ``prefix``."""
    import sys

    return sorted(m for m in sys.modules if m == prefix or m.startswith(prefix + "."))
