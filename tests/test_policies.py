"""Wait policies (max_wait, on_full) and failure policies (retry, fallback) on real workers."""

from __future__ import annotations

import json

import pytest
from celery import Celery

from celery_throttled.policies import RetryPolicy
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


def test_a_retry_waits_its_policys_backoff_to_the_fraction_of_a_second(
    workers: Workers, client, probe, prefix
):
    """Given a task retried twice with RetryPolicy(backoff=0.6, jitter=False),
    When it runs,
    Then each retry's eta is its backoff after the retry was asked for: 0.6 s, then 1.2 s
    (read off the retried messages, so the worker's load does not enter): a backoff handed to
    Celery's retry_backoff, which keeps whole seconds only (1 s, then 2 s; a backoff_max under
    1 s becomes no backoff at all), fails here."""
    workers.start(pool="threads", concurrency=2)
    assert envelope(client, client.send_task("t.retrying", ("b",))).ok
    events = [json.loads(e) for e in probe.lrange(f"{prefix}:probe:policy:retries", 0, -1)]
    asked = {e["retries"]: e["asked"] for e in events if "asked" in e}
    eta = {e["retries"]: e["eta"] for e in events if "eta" in e}
    assert sorted(asked) == [0, 1] and sorted(eta) == [1, 2], events
    assert eta[1] - asked[0] == pytest.approx(0.6, abs=0.1)
    assert eta[2] - asked[1] == pytest.approx(1.2, abs=0.1)
    wait_drained(probe, prefix, "policy")


def test_a_retry_policy_s_delay_doubles_up_to_its_max_with_full_jitter():
    """Given RetryPolicy(backoff=0.02, backoff_max=0.05),
    When the delay of each retry is asked for,
    Then it doubles from 0.02 s up to 0.05 s without jitter, and with jitter lies between 0 and
    that: a delay in whole seconds (0.02 read as 1 s, 0.05 as none at all) fails here."""
    steady = RetryPolicy(backoff=0.02, backoff_max=0.05, jitter=False)
    assert [steady.delay(n) for n in range(4)] == [0.02, 0.04, 0.05, 0.05]
    jittered = RetryPolicy(backoff=0.02, backoff_max=0.05)
    assert all(0 <= jittered.delay(n) <= steady.delay(n) for n in range(4) for _ in range(50))


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
