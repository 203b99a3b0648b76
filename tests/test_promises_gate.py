"""The gate's promises on real workers: who goes first, how much a worker holds, what an
outage, a rejection and a revocation do."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from .conftest import RedisServer, Workers, holds_for, wait_until
from .probes import leases, peak, queued, started, unacknowledged, wait_drained
from .test_envelope import envelope
from .topologies import UnixRedis

pytestmark = pytest.mark.timeout(240)


def test_a_granted_request_goes_to_the_front_of_the_pool_queue(
    workers: Workers, client: Celery, probe, prefix
):
    """Given a prefork worker with one pool process, busy with a plain task, and four plain
    tasks queued for that process, when a throttled task arrives behind them and is granted its
    slot, then it runs next, before the four. Catches: a granted request left at the back of the
    pool queue, keeping its cluster-wide slot idle while unthrottled work runs."""
    workers.start(pool="prefork", concurrency=1, PREFETCH=8)
    hog = client.send_task("t.plain", ("hog", 1.0))
    wait_until(lambda: started(probe, prefix, "plain"), 30, what="the hog to start")
    plain = [client.send_task("t.plain", (f"p{i}", 0.05)) for i in range(4)]
    capped = client.send_task("t.limited", ("capped", 0.05))
    assert capped.get(timeout=30) == "capped"
    assert [r.get(timeout=30) for r in [hog, *plain]] == ["hog", "p0", "p1", "p2", "p3"]
    capped_start = dict(started(probe, prefix, "limited"))["capped"]
    plain_starts = dict(started(probe, prefix, "plain"))
    assert all(capped_start < plain_starts[f"p{i}"] for i in range(4)), (capped_start, plain_starts)
    wait_drained(probe, prefix, "t.limited")


@pytest.mark.parametrize("transport", ["event loop", "threads"], ids=["eventloop", "threads"])
def test_a_run_longer_than_its_lease_keeps_its_slot(
    workers: Workers, client: Celery, probe, prefix, tmp_path: Path, transport: str
):
    """Given two workers with leases of 1 s (renewed every third of it), on either transport,
    when 4 tasks of 2 s each run at a cap of 2, then never more than 2 run: the running leases
    are renewed, not reaped, while their tasks outlive the TTL. Catches: renewals that skip (or
    do not extend) running leases, which would let waiters take slots that are still in use (or,
    when the waiters' own places lapse with them, starve the line)."""
    env: dict[str, Any] = {"LEASE_TTL": 1}
    unix = UnixRedis(tmp_path)
    if transport == "threads":
        env["LIMITER_URL"] = unix.start().url  # a unix socket: the threads transport
    try:
        for name in ("a", "b"):
            worker = workers.start(pool="threads", concurrency=4, name=name, **env)
            assert f"through the {transport}" in worker.output()
        results = [client.send_task("t.limited", (f"x{i}", 2.0)) for i in range(4)]
        wait_until(lambda: all(r.ready() for r in results) or peak(probe, prefix, "limited") > 2,
                   30, what="every run to end (or the cap to be exceeded)")  # fmt: skip
        assert peak(probe, prefix, "limited") == 2
        assert sorted(r.get(timeout=60) for r in results) == [f"x{i}" for i in range(4)]
    finally:
        workers.stop_all()
        unix.stop()


def test_the_oldest_waiter_in_the_cluster_is_served_first(
    workers: Workers, client: Celery, probe, prefix
):
    """Given two workers and a cap of 1 held by a long run, when eight tasks arrive one after
    another (each waiting before the next is sent) and spread over both workers, then they run
    in the order they arrived, across workers. Catches: a line kept per worker (each worker
    serving its own waiters first), or grants in any order but arrival."""
    names = [workers.start(pool="threads", concurrency=4, name=n).name for n in ("a", "b")]
    hold = client.send_task("t.fair", (-1, 1.5))
    wait_until(lambda: started(probe, prefix, "fair"), 30, what="the long run to start")
    results = []
    for i in range(8):
        results.append(client.send_task("t.fair", (i, 0.02)))
        count = i + 1
        wait_until(
            lambda: leases(probe, prefix, "t.fair")["waiters"] == count,  # noqa: B023
            10,
            what=f"{count} waiting",
        )
    hold.get(timeout=30)
    for r in results:
        r.get(timeout=30)
    runs = [label.split("@", 1) for label, _ in started(probe, prefix, "fair")][1:]
    assert [int(index) for index, _ in runs] == list(range(8)), runs
    assert {host for _, host in runs} == set(names), "one worker held them all"
    assert peak(probe, prefix, "fair") == 1


def test_throttle_max_held_bounds_the_messages_a_worker_holds(
    workers: Workers, client: Celery, probe, prefix
):
    """Given a worker with a prefetch window of 2 and ``throttle_max_held=2``, when 8 tasks wait
    behind a full cap, then it holds 4 of them (its window, widened by 2) and the other 4 stay
    in the broker. Catches: a widening that ignores throttle_max_held, so one worker would pull
    a whole backlog out of the broker."""
    workers.start(pool="prefork", concurrency=2, MAX_HELD=2)
    running = [client.send_task("t.limited", (f"r{i}", 3.0)) for i in range(2)]
    wait_until(lambda: len(started(probe, prefix, "limited")) == 2, 30, what="2 to run")
    waiting = [client.send_task("t.limited", (f"w{i}", 0.05)) for i in range(8)]
    ids = [r.id for r in waiting]
    wait_until(lambda: leases(probe, prefix, "t.limited")["waiters"] == 4, 10, what="4 held")
    holds_for(
        lambda: (
            leases(probe, prefix, "t.limited")["waiters"] == 4
            and len(queued(probe, prefix, ids)) == 4
        ),
        1.0,
        what="4 held, 4 in the broker",
    )
    assert sorted(r.get(timeout=60) for r in running + waiting) == sorted(
        [f"r{i}" for i in range(2)] + [f"w{i}" for i in range(8)]
    )
    assert peak(probe, prefix, "limited") == 2


def outage(
    workers: Workers,
    client: Celery,
    probe,
    prefix: str,
    redis: RedisServer,
    *,
    before: int,
    after: int,
) -> None:
    """Worker A runs 2 tasks at a cap of 2; worker B holds ``before`` waiters; the limiter's Redis
    restarts empty while A is stalled; B reconnects first and gets ``after`` new tasks; then A
    comes back. Every task must run, never more than 2 at once."""
    env: dict[str, Any] = {"LIMITER_URL": redis.url}
    a = workers.start(pool="prefork", concurrency=2, name="a", **env)
    running = [client.send_task("t.limited_late", (f"x{i}", 6.0)) for i in range(2)]
    wait_until(lambda: len(started(probe, prefix, "limited")) == 2, 30, what="A to run 2")
    b = workers.start(pool="threads", concurrency=4, name="b", **env)
    os.kill(a.proc.pid, signal.SIGSTOP)  # A stalls; its pool processes keep running x0, x1
    try:
        early = [client.send_task("t.limited", (f"y{i}", 0.1)) for i in range(before)]
        wait_until(
            lambda: leases_on(redis.url, prefix)["waiters"] == before,
            30,
            what=f"B to hold {before}",
        )
        redis.stop()
        redis.start()
        wait_until(lambda: "reachable again" in b.output(), 30, what="B to reconnect")
        late = [client.send_task("t.limited", (f"z{i}", 0.1)) for i in range(after)]
        wait_until(
            lambda: all(f"[{r.id}] received" in b.output() for r in late),
            10,
            what="B to receive the new tasks",
        )
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    done = sorted(r.get(timeout=60) for r in running + early + late)
    expected = ["x0", "x1"] + [f"y{i}" for i in range(before)] + [f"z{i}" for i in range(after)]
    assert done == expected
    assert "had vanished from Redis and were put back" in a.output()
    assert peak(probe, prefix, "limited") == 2


def test_after_an_outage_no_new_task_is_admitted_before_running_leases_are_back(
    private_redis: RedisServer, workers: Workers, client: Celery, probe, prefix
):
    """Given worker A running 2 tasks at a cap of 2 on a limiter Redis that restarts empty while
    A is stalled, when worker B is back first and 2 new tasks reach it, then B admits neither
    before A has put its running leases back: never more than 2 run. Catches: acquires sent to
    a Redis that came back empty without the grace period that lets every worker re-assert its
    running leases first."""
    outage(workers, client, probe, prefix, private_redis, before=0, after=2)


def test_after_an_outage_waiters_are_not_granted_before_running_leases_are_back(
    private_redis: RedisServer, workers: Workers, client: Celery, probe, prefix
):
    """Given worker A running 2 tasks at a cap of 2 and worker B holding 2 waiters, on a limiter
    Redis that restarts empty while A is stalled, when B is back first (its renewal puts its
    waiters back in line), then B admits neither before A has put its running leases back:
    never more than 2 run. Catches: a renewal that grants re-queued waiters on a Redis that came
    back empty before the other workers re-asserted their running leases."""
    outage(workers, client, probe, prefix, private_redis, before=2, after=0)


def leases_on(url: str, prefix: str) -> dict[str, int]:
    import redis

    return leases(redis.Redis.from_url(url, decode_responses=True), prefix, "t.limited")


def test_a_rejected_task_is_acknowledged(workers: Workers, client: Celery, probe, prefix):
    """Given the only slot of "sleepy" busy, when a task with ``on_full="reject"`` and one with
    ``max_wait=0.3`` are refused, then each settles as rejected and its message is acknowledged
    (nothing of it left unacknowledged or queued in the broker). Catches: a refusal that writes
    the envelope but leaves the message unacknowledged, to be delivered again after the
    visibility timeout."""
    workers.start(pool="prefork", concurrency=4)
    busy = client.send_task("t.sleeper", ("busy", 1.5))
    wait_until(lambda: started(probe, prefix, "sleepy"), 30, what="the busy task to start")
    refused = [
        client.send_task("t.reject_when_full", ("now",)),
        client.send_task("t.impatient", ("later",)),
    ]
    for res in refused:
        env = envelope(client, res)
        assert env.error is not None and env.error.kind == "rejected", env
    ids = [r.id for r in refused]
    wait_until(
        lambda: not unacknowledged(probe, ids) and not queued(probe, prefix, ids),
        10,
        what="the rejected messages to be acknowledged",
    )
    assert envelope(client, busy).ok
    assert started(probe, prefix, "sleepy_policy") == []


def test_revoked_tasks_settle_as_revoked(workers: Workers, client: Celery, probe, prefix):
    """Given a task waiting for the only slot of "fragile" and another running in it, when the
    waiting one is revoked and the running one revoked with terminate=True, then both
    envelopes say "revoked" (Celery's state REVOKED), and the slot serves the next task.
    Catches: a revocation reported as a plain error (or not at all) in the envelope."""
    workers.start(pool="prefork", concurrency=3)
    running = client.send_task("t.survivor", ("running", 30))
    wait_until(lambda: started(probe, prefix, "fragile"), 30, what="the first task to start")
    held = client.send_task("t.survivor", ("held", 0))
    wait_until(lambda: leases(probe, prefix, "fragile")["waiters"] == 1, 10, what="a waiter")
    client.control.revoke(held.id)
    env = envelope(client, held)
    assert env.error is not None and env.error.kind == "revoked", env
    assert held.state == "REVOKED"
    client.control.revoke(running.id, terminate=True)
    env = envelope(client, running)
    assert env.error is not None and env.error.kind == "revoked", env
    assert running.state == "REVOKED"
    assert client.send_task("t.survivor", ("next", 0)).get(timeout=30) == "next"
    assert [label for label, _ in started(probe, prefix, "fragile")] == ["running", "next"]
    wait_drained(probe, prefix, "fragile")
