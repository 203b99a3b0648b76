"""Workers dying, shutting down and holding too long; the limiter's Redis going away."""

from __future__ import annotations

import collections
import os
import signal
import time
from typing import Any

import pytest
import redis

from .conftest import RedisServer, Workers, make_client, wait_until
from .probes import (
    finished,
    leases,
    peak,
    queued,
    span_peak,
    started,
    unacknowledged,
    wait_drained,
)
from .test_envelope import envelope

pytestmark = pytest.mark.timeout(240)


def labels(events):
    return collections.Counter(label for label, _ in events)


def test_killed_worker_slots_return_after_ttl_and_held_messages_run_once(
    workers: Workers, client, probe, prefix
):
    """Given a worker running 2 capped tasks and holding 4 more, with leases (12 s) that outlive
    the broker's visibility timeout (2 s), when the whole worker is SIGKILLed and another one
    starts, then the 4 held messages come back while the dead worker's leases are still live,
    and the heir waits for those leases: the dead runs (counted until their leases expired) and
    the heir's runs never exceed the cap of 2. The 2 killed runs are reported as worker_lost by
    the heir, and every task ran exactly once, still so once no message of them is left
    unacknowledged or queued. Catches: a worker that ignores another worker's live leases, a
    reaper that reports nothing, and a redelivery that runs a task twice."""
    env: dict[str, Any] = {"LEASE_TTL": 12, "VISIBILITY": 2}
    doomed = workers.start(pool="prefork", concurrency=4, name="doomed", **env)
    results = [client.send_task("t.limited", (f"x{i}", 3.0 if i < 2 else 0.3)) for i in range(6)]
    ids = [r.id for r in results]
    wait_until(
        lambda: leases(probe, prefix, "t.limited") == {"holders": 2, "waiters": 4},
        30,
        what="2 running and 4 waiting",
    )
    wait_until(lambda: len(started(probe, prefix, "limited")) == 2, 30, what="2 to start")
    running = {label for label, _ in started(probe, prefix, "limited")}
    # When the whole worker is SIGKILLed
    os.killpg(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait()
    killed_at = time.time()
    dead = probe.zrange(f"{prefix}:{{t.limited}}:h", 0, -1, withscores=True)
    assert len(dead) == 2
    dead_ends = sorted(score / 1000 for _, score in dead)  # when the dead leases expire
    probe.set(f"{prefix}:probe:limited:now", 0)  # the killed tasks will never decrement it
    probe.set(f"{prefix}:probe:limited:peak", 0)
    # And another worker starts
    workers.start(pool="prefork", concurrency=4, name="heir", **env)
    holders = f"{prefix}:{{t.limited}}:h"
    wait_until(
        lambda: (
            leases(probe, prefix, "t.limited")["waiters"] >= 1
            and set(probe.zrange(holders, 0, -1)) == {h for h, _ in dead}
        ),
        30,
        what="the heir to wait behind the dead worker's live leases",
    )
    # Then the 4 held messages are delivered again and each runs exactly once,
    wait_until(
        lambda: len(finished(probe, prefix, "limited")) >= 4,
        60,
        what="the held tasks to run on the other worker",
    )
    counts = labels(started(probe, prefix, "limited"))
    redelivered = {f"x{i}" for i in range(6)} - running
    assert {label: counts[label] for label in redelivered} == dict.fromkeys(redelivered, 1)
    # not before the dead worker's leases expired, and never above the cap
    heir_starts = sorted(
        s for label, s in started(probe, prefix, "limited") if label in redelivered
    )
    assert heir_starts[0] >= killed_at + 1.0
    assert heir_starts[0] >= dead_ends[0], "a run started while both dead leases were live"
    ends = dict(finished(probe, prefix, "limited"))
    spans = [
        (s, e)
        for s, e in zip(
            sorted(s for label, s in started(probe, prefix, "limited") if label in running),
            dead_ends,
            strict=True,
        )
    ]
    spans += [
        (s, ends[label]) for label, s in started(probe, prefix, "limited") if label in redelivered
    ]
    assert span_peak(spans) <= 2, spans
    assert peak(probe, prefix, "limited") <= 2
    assert all(results[int(label[1:])].get(timeout=30) == label for label in redelivered)
    # And the heir reported the two killed runs as lost
    for label in running:
        lost = envelope(client, results[int(label[1:])])
        assert lost.error is not None and lost.error.kind == "worker_lost", lost
        assert "presumed dead" in lost.error.message
    # And once no message of them is left to deliver, each still ran exactly once
    wait_until(
        lambda: not unacknowledged(probe, ids) and not queued(probe, prefix, ids),
        30,
        what="every message to be acknowledged",
    )
    assert set(labels(started(probe, prefix, "limited")).values()) == {1}
    wait_drained(probe, prefix, "t.limited")


def test_warm_shutdown_hands_held_messages_back(workers: Workers, client, probe, prefix):
    # Given a worker running 2 capped tasks and holding 4
    first = workers.start(pool="prefork", concurrency=4, name="first")
    results = [client.send_task("t.limited", (f"x{i}", 1.0)) for i in range(6)]
    wait_until(
        lambda: leases(probe, prefix, "t.limited") == {"holders": 2, "waiters": 4},
        30,
        what="2 running and 4 waiting",
    )
    # When it is stopped warmly
    assert first.stop() == 0
    # Then its running tasks finished and released, and it held nothing back
    assert len(finished(probe, prefix, "limited")) == 2
    wait_drained(probe, prefix, "t.limited")
    # And another worker runs the 4 it handed back, each exactly once
    workers.start(pool="threads", concurrency=4, name="second")
    assert sorted(r.get(timeout=60) for r in results) == [f"x{i}" for i in range(6)]
    assert set(labels(started(probe, prefix, "limited")).values()) == {1}
    assert peak(probe, prefix, "limited") == 2


def test_messages_held_past_max_hold_go_back_and_run_once(workers: Workers, client, probe, prefix):
    # Given a worker that may hold a message for only 0.3 s
    worker = workers.start(pool="prefork", concurrency=4, MAX_HOLD=0.3)
    # When 6 tasks of 0.5 s queue behind a cap of 2
    results = [client.send_task("t.limited", (f"x{i}", 0.5)) for i in range(6)]
    # Then they are handed back while they wait, yet each runs exactly once, under the cap
    assert sorted(r.get(timeout=60) for r in results) == [f"x{i}" for i in range(6)]
    assert set(labels(started(probe, prefix, "limited")).values()) == {1}
    assert peak(probe, prefix, "limited") == 2
    assert "handing it back to the broker" in worker.output()
    wait_drained(probe, prefix, "t.limited")


def test_limiter_redis_restart_fails_closed_and_recovers(
    private_redis: RedisServer, workers: Workers, client, probe, prefix
):
    # Given a worker whose limiter lives on its own Redis
    worker = workers.start(pool="prefork", concurrency=4, LIMITER_URL=private_redis.url)
    results = [client.send_task("t.limited", (f"x{i}", 0.5)) for i in range(10)]
    wait_until(lambda: peak(probe, prefix, "limited") == 2, 30, what="the backlog to start")
    # When that Redis goes away for a while
    private_redis.stop()
    # Then unthrottled tasks keep running meanwhile
    plain = [client.send_task("t.plain", (f"p{i}", 0.05)) for i in range(4)]
    assert [r.get(timeout=30) for r in plain] == [f"p{i}" for i in range(4)]
    assert len(finished(probe, prefix, "limited")) < 10
    # And when it comes back, empty, every throttled task completes, never above the cap
    private_redis.start()
    assert sorted(r.get(timeout=90) for r in results) == sorted(f"x{i}" for i in range(10))
    assert peak(probe, prefix, "limited") == 2
    # With exactly one error logged for the outage
    assert worker.output().count("is unreachable") == 1
    assert "reachable again" in worker.output()


@pytest.mark.rabbitmq
def test_cap_holds_with_a_rabbitmq_broker(workers: Workers, probe, prefix, redis_url, rabbitmq_url):
    # Given two workers consuming from RabbitMQ, with the limiter and results on Redis
    rabbit_client = make_client(rabbitmq_url, redis_url, prefix)
    workers.client = rabbit_client
    try:
        for pool in ("prefork", "threads"):
            workers.start(pool=pool, concurrency=4, BROKER_URL=rabbitmq_url)
        # When 12 capped tasks are submitted
        results = [rabbit_client.send_task("t.limited", (f"x{i}", 0.15)) for i in range(12)]
        # Then all run, at most 2 at a time
        assert sorted(r.get(timeout=60) for r in results) == sorted(f"x{i}" for i in range(12))
        assert peak(probe, prefix, "limited") == 2
        wait_drained(probe, prefix, "t.limited")
    finally:
        rabbit_client.close()


def test_renewals_never_revive_released_leases(
    private_redis: RedisServer, workers: Workers, client, probe, prefix
):
    # Given a limiter Redis that has never seen the scripts, and renewals every 0.1 s
    worker = workers.start(
        pool="prefork", concurrency=4, LEASE_TTL=0.3, LIMITER_URL=private_redis.url
    )
    # When many short capped tasks start and end while renewals run
    results = [client.send_task("t.panic", ("ok",)) for _ in range(300)]
    for r in results:
        r.get(timeout=60)
    # Then every lease is gone once they are done, and none was ever put back
    limiter = redis.Redis.from_url(private_redis.url)
    wait_until(
        lambda: limiter.zcard(f"{prefix}:{{t.panic}}:h") == 0, 10, what="every lease to be released"
    )
    assert "vanished" not in worker.output()


def test_limiter_url_by_name_tries_every_address(
    private_redis: RedisServer, workers: Workers, client, probe, prefix
):
    # Given a limiter URL naming "localhost", whose Redis listens on 127.0.0.1 only (the name
    # may resolve to ::1 first)
    url = f"redis://localhost:{private_redis.port}/0"
    workers.start(pool="prefork", concurrency=4, LIMITER_URL=url)
    # Then the worker's event-loop connections reach it and the cap holds
    results = [client.send_task("t.limited", (f"x{i}", 0.1)) for i in range(6)]
    assert sorted(r.get(timeout=30) for r in results) == [f"x{i}" for i in range(6)]
    assert peak(probe, prefix, "limited") == 2
