"""The Celery app of the demo: ``celery -A demo worker`` from ``demo_project/``.

Configured from the environment: ``REDIS_URL`` (broker, results and limiter),
``DOWNSTREAM_URL`` (the fragile service), ``DEMO_PREFIX`` (key prefix and queue name).
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("DEMO_PREFIX", "demo")

app = Celery("demo", broker=REDIS_URL, backend=REDIS_URL, include=["demo.tasks"])
app.conf.update(
    task_default_queue=PREFIX,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    throttle_key_prefix=PREFIX,
)
# the app of every thread (the web app serves each request on a thread of its own)
app.set_default()
