"""An in-process worker from ``celery.contrib.pytest`` runs throttled tasks through the gate too."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from celery.contrib.testing.worker import start_worker

from celery_throttled import ThrottledTask


@pytest.fixture(scope="session")
def celery_config(redis_url: str) -> dict[str, Any]:
    return {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "task_default_queue": "inprocess",
        "throttle_key_prefix": "inprocess",
        "task_serializer": "json",
        "accept_content": ["json"],
    }


@pytest.mark.timeout(60)
def test_in_process_worker_holds_the_cap(celery_app, redis_url: str):
    probe = redis.Redis.from_url(redis_url)
    probe.delete("inprocess:now", "inprocess:peak")

    @celery_app.task(base=ThrottledTask, throttle_limit=1, name="inprocess.one_at_a_time")
    def one_at_a_time(i: int) -> int:
        now = probe.incr("inprocess:now")
        probe.set("inprocess:peak", max(now, int(probe.get("inprocess:peak") or 0)))
        try:
            time.sleep(0.05)  # the work itself, so that runs could overlap
        finally:
            probe.decr("inprocess:now")
        return i

    with start_worker(celery_app, pool="threads", concurrency=4, perform_ping_check=False):
        results = [one_at_a_time.delay(i) for i in range(6)]
        assert [r.get(timeout=30).unwrap() for r in results] == list(range(6))
    assert int(probe.get("inprocess:peak") or 0) == 1
