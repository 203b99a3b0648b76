"""Wait policies (max_wait, on_full) and failure policies (retry, fallback) on real workers."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_throttled.status import inspect

from .conftest import Workers, wait_until
from .probes import finished, started, wait_drained
from .test_cli import limiter_app
from .test_envelope import envelope

pytestmark = pytest.mark.timeout(180)


def test_on_full_reject_and_max_wait(workers: Workers, client: Celery, probe, prefix, redis_url):
    workers.start(pool="prefork", concurrency=4)
    # Given the only slot of "sleepy" busy for 2 s
    busy = client.send_task("t.sleeper", ("busy", 2.0))
    wait_until(lambda: started(probe, prefix, "sleepy"), 30, what="the busy task to start")
    # When a task that will not wait arrives, and one that waits at most 0.3 s
    rejected = envelope(client, client.send_task("t.reject_when_full", ("now",)))
    impatient = envelope(client, client.send_task("t.impatient", ("later",)))
    # Then both settle as "rejected" without running, each saying why
    assert rejected.error is not None and rejected.error.kind == "rejected"
    assert "no slot of 'sleepy' was free" in rejected.error.message
    assert rejected.error.type == "celery_throttled.errors.Rejected"
    assert impatient.error is not None and impatient.error.kind == "rejected"
    assert "max_wait=0.3" in impatient.error.message
    assert started(probe, prefix, "sleepy_policy") == []
    assert envelope(client, busy).ok
    # And operators see them counted
    status = inspect(limiter_app(redis_url, prefix), ["sleepy"])[0]
    assert status.rejected == 2
    wait_drained(probe, prefix, "sleepy")


def test_retry_releases_the_slot_during_backoff(workers: Workers, client, probe, prefix):
    workers.start(pool="threads", concurrency=4)
    # Given a task that fails twice with OSError, retried with a 0.6 s backoff, cap 1
    result = client.send_task("t.retrying", ("r",))
    wait_until(lambda: finished(probe, prefix, "policy"), 30, what="the first attempt to end")
    # When another task of the same key arrives during the backoff
    quick = client.send_task("t.policy_quick", ("quick",))
    env = envelope(client, result)
    # Then it ran while the retry waited, and the retried task ended ok on its third attempt
    assert envelope(client, quick).ok
    assert env.ok and env.value == "r" and env.attempts == 3
    order = [label for label, _ in started(probe, prefix, "policy")]
    assert order.index("quick") < order.index("r#1")
    wait_drained(probe, prefix, "policy")


def test_fallback_degrades_with_the_error_kept(workers: Workers, client):
    workers.start(pool="solo", concurrency=1)
    result = client.send_task("t.degrading", ("sku-1",))
    env = envelope(client, result)
    assert env.ok and env.degraded
    assert env.value == {
        "sku": "sku-1",
        "price": 9.99,
        "stale": True,
        "because": "builtins.ValueError",
    }
    assert env.error is not None and env.error.type == "builtins.ValueError"
    assert "pricing service down" in env.error.message
    assert result.state == "SUCCESS"
