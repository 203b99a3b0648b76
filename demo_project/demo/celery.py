"""The Celery app of the demo, configured from the environment (``REDIS_URL``)."""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("demo", broker=REDIS_URL, backend=REDIS_URL, include=["demo.tasks"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    throttle_key_prefix=os.environ.get("DEMO_PREFIX", "demo"),
)
