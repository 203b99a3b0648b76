"""Celery's own features keep working on throttled tasks."""

from __future__ import annotations

import time

import pytest
from celery import chord, group

from .conftest import Workers, wait_until
from .probes import leases, peak, started, wait_drained

pytestmark = pytest.mark.timeout(180)


def test_countdown_eta_and_expires(workers: Workers, client, probe, prefix):
    # Given a worker and the only slot of "fragile" busy for a while
    workers.start(pool="prefork", concurrency=4)
    busy = client.send_task("t.survivor", ("busy", 1.5))
    wait_until(lambda: started(probe, prefix, "fragile"), 30, what="the busy task to start")
    # When one task waits behind it with a short expiry, and another is sent with a countdown
    expiring = client.send_task("t.survivor", ("expiring", 0), expires=0.5)
    sent = time.time()
    delayed = client.send_task("t.limited", ("later", 0), countdown=1)
    # Then the expiring one is discarded without running, the delayed one runs after its countdown
    assert delayed.get(timeout=30) == "later"
    ((_label, stamp),) = started(probe, prefix, "limited")
    assert stamp >= sent + 1 - 0.05
    assert busy.get(timeout=30) == "busy"
    wait_until(lambda: expiring.state == "REVOKED", 10, what="the expired task to be revoked")
    assert [label for label, _ in started(probe, prefix, "fragile")] == ["busy"]
    wait_drained(probe, prefix, "fragile")


def test_group_chord_retry_rate_limit_and_acks_late(workers: Workers, client, probe, prefix):
    workers.start(pool="prefork", concurrency=4)
    sig = client.signature
    # A group of throttled tasks returns every result, in order, under the cap
    res = group(sig("t.limited", (f"g{i}", 0.05)) for i in range(6)).apply_async()
    assert res.get(timeout=60) == [f"g{i}" for i in range(6)]
    assert peak(probe, prefix, "limited") == 2
    # A chord's body runs with every header result
    body = sig("t.collect")
    res = chord([sig("t.limited", (f"c{i}", 0.05)) for i in range(4)])(body)
    assert res.get(timeout=60) == [f"c{i}" for i in range(4)]
    # Retries re-enter the gate like any delivery and end with the value
    assert client.send_task("t.flaky", ("f",)).get(timeout=60) == "f"
    assert [label for label, _ in started(probe, prefix, "flaky")] == ["f#0", "f#1", "f#2"]
    # rate_limit and acks_late still apply
    results = [client.send_task("t.rate_limited", (f"r{i}",)) for i in range(5)]
    assert [r.get(timeout=30) for r in results] == [f"r{i}" for i in range(5)]
    assert client.send_task("t.late", ("l",)).get(timeout=30) == "l"
    for key in ("t.limited", "t.flaky", "t.rate_limited", "t.late"):
        wait_drained(probe, prefix, key)
    assert leases(probe, prefix, "t.limited") == {"holders": 0, "waiters": 0}
