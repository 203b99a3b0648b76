"""Waiters parked in idle pool processes (worker/parking.py, pool/parking.py): a hand-off that
skips the worker's dispatch, and every way a parked waiter leaves its process unrun."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from celery import Celery

from celery_throttled.keys import Family

from .conftest import RedisServer, Worker, Workers, wait_until
from .probes import (
    leases,
    peak,
    queued,
    script_calls,
    started,
    unacknowledged,
    wait_drained,
)
from .test_envelope import envelope

pytestmark = pytest.mark.timeout(120)


def parked(probe: redis.Redis, worker: Worker) -> int:
    """How many of ``worker``'s pool processes hold a parked waiter now: blocked on a park list
    (the parked hash would not say: a waiter is marked there as its acquire puts it in line)."""
    return len(_parked_processes(probe, worker.children()))


def labels(probe: redis.Redis, prefix: str, group: str) -> list[str]:
    return [label for label, _ in started(probe, prefix, group)]


def test_a_parked_waiter_starts_while_its_worker_is_stopped(
    workers: Workers, client: Celery, probe, prefix: str
):
    """Given a prefork worker running the only slot of "fragile" with a second task parked in
    an idle pool process, when the worker's main process is stopped (SIGSTOP) and the first
    body ends, then the second body starts all the same: its grant went from the pool process
    that freed the slot, through Redis, straight to the parked process, and the cap held.
    Catches: a hand-off that still needs the worker's dispatch (no parking, or a grant that
    does not push "go" onto the park list)."""
    worker = workers.start(pool="prefork", concurrency=3, PARK="1")
    first = client.send_task("t.survivor", ("first", 1.5))
    wait_until(lambda: labels(probe, prefix, "fragile") == ["first"], 30, what="the first task")
    second = client.send_task("t.survivor", ("second", 0))
    wait_until(lambda: parked(probe, worker) == 1, 15, what="the second to park")
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: labels(probe, prefix, "fragile") == ["first", "second"],
            15,
            what="the parked task to start while its worker is stopped",
        )
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    assert first.get(timeout=30) == "first"
    assert second.get(timeout=30) == "second"
    assert peak(probe, prefix, "fragile") == 1
    assert "go was lost" not in worker.output()  # told by the grant, not found by its poll
    wait_drained(probe, prefix, "fragile")


def test_a_parked_waiter_gives_its_process_to_unthrottled_work(
    workers: Workers, client: Celery, probe, prefix: str
):
    """Given a prefork worker of two processes, one running the only slot of "fragile" for
    4 s and the other holding a parked waiter, when an unthrottled task arrives, then it starts
    while the slot is still held (the parked waiter left its process for it), and the parked
    waiter still runs once the slot is free. Catches: parking that keeps pool processes from
    unrelated work (no make_room), or a waiter lost when it leaves its process."""
    worker = workers.start(pool="prefork", concurrency=2, PARK="1")
    first = client.send_task("t.survivor", ("first", 4))
    wait_until(lambda: labels(probe, prefix, "fragile") == ["first"], 30, what="the first task")
    waiter = client.send_task("t.survivor", ("waiter", 0))
    wait_until(lambda: parked(probe, worker) == 1, 15, what="the waiter to park")
    plain = client.send_task("t.plain", ("plain", 0))
    assert plain.get(timeout=3) == "plain"
    assert labels(probe, prefix, "fragile") == ["first"]  # the slot is still held
    assert parked(probe, worker) == 0
    assert first.get(timeout=30) == "first"
    assert waiter.get(timeout=30) == "waiter"
    assert labels(probe, prefix, "fragile") == ["first", "waiter"]
    wait_drained(probe, prefix, "fragile")


def test_a_parked_waiter_whose_process_is_killed_waits_again(
    workers: Workers, client: Celery, probe, prefix: str
):
    """Given a parked waiter, when its pool process is SIGKILLed while it waits and the running
    task then ends, its slot going to the waiter (whose "go" lies unread on its park list)
    before the worker hears of either (its main process stopped meanwhile), then the waiter
    runs once, after the slot is freed, with an ok result: the slot stays with it and it is
    dispatched as usual. Catches: a parked job's lost process reported as the task's failure
    (its body never ran), or the waiter dropped from the line or its slot leaked."""
    worker = workers.start(pool="prefork", concurrency=2, PARK="1")
    first = client.send_task("t.survivor", ("first", 0, True))  # runs until released
    wait_until(lambda: labels(probe, prefix, "fragile") == ["first"], 30, what="the first task")
    waiter = client.send_task("t.survivor", ("waiter", 0))
    wait_until(lambda: parked(probe, worker) == 1, 15, what="the waiter to park")
    [process] = _parked_processes(probe, worker.children())
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        os.kill(process, signal.SIGKILL)
        wait_until(
            lambda: not [c for c in probe.client_list() if c.get("cmd") == "blpop"],
            15,
            what="Redis to drop the killed process's connection",
        )
        probe.rpush(f"{prefix}:probe:release", "first")
        assert first.get(timeout=30) == "first"  # its pool process freed the slot, and stored it
        wait_until(
            lambda: leases(probe, prefix, "fragile") == {"holders": 1, "waiters": 0},
            15,
            what="the slot to go to the waiter",
        )
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    assert waiter.get(timeout=30) == "waiter"
    assert labels(probe, prefix, "fragile") == ["first", "waiter"]
    assert peak(probe, prefix, "fragile") == 1
    wait_drained(probe, prefix, "fragile")


def test_a_parked_waiter_is_handed_back_at_warm_shutdown_and_runs_once(
    workers: Workers, client: Celery, probe, prefix: str
):
    """Given a parked waiter, when its worker gets SIGTERM while the slot is held, then the
    worker exits without running it, and a worker started afterwards runs it exactly once.
    Catches: a parked job started by the grant that the running task's end makes during the
    shutdown, or its message acknowledged and lost."""
    worker = workers.start(pool="prefork", concurrency=2, PARK="1")
    first = client.send_task("t.survivor", ("first", 1.5))
    wait_until(lambda: labels(probe, prefix, "fragile") == ["first"], 30, what="the first task")
    waiter = client.send_task("t.survivor", ("waiter", 0))
    wait_until(lambda: parked(probe, worker) == 1, 15, what="the waiter to park")
    worker.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: not worker.alive(), 30, what="the worker to exit")
    assert first.get(timeout=10) == "first"
    assert labels(probe, prefix, "fragile") == ["first"]
    workers.start(pool="prefork", concurrency=2, PARK="1")
    assert waiter.get(timeout=30) == "waiter"
    assert labels(probe, prefix, "fragile") == ["first", "waiter"]
    wait_drained(probe, prefix, "fragile")


def test_a_parked_waiter_revoked_never_runs(workers: Workers, client: Celery, probe, prefix: str):
    """Given a parked waiter of "fragile", when it is revoked and, 3 ms later, the running
    task is revoked with terminate=True (its slot freed at once), then the waiter settles as
    revoked and never runs, and the slot serves the next task. Catches: a revocation that
    reaches a parked waiter only with the sweep, after the freed slot has started it in its
    pool process (the gate's check at admission is skipped there)."""
    worker = workers.start(pool="prefork", concurrency=3, PARK="1")
    running = client.send_task("t.survivor", ("running", 30))
    wait_until(lambda: labels(probe, prefix, "fragile") == ["running"], 30, what="the first")
    held = client.send_task("t.survivor", ("held", 0))
    wait_until(lambda: parked(probe, worker) == 1, 15, what="the waiter to park")
    client.control.revoke(held.id)
    client.control.revoke(running.id, terminate=True)
    env = envelope(client, held)
    assert env.error is not None and env.error.kind == "revoked", env
    assert client.send_task("t.survivor", ("next", 0)).get(timeout=30) == "next"
    assert labels(probe, prefix, "fragile") == ["running", "next"]
    wait_drained(probe, prefix, "fragile")


def test_a_parked_waiter_past_max_wait_is_rejected_unrun(
    workers: Workers, client: Celery, probe, prefix: str
):
    """Given a parked waiter with max_wait=0.3 behind a 1.5 s task, when its wait passes
    max_wait, then it settles as rejected without running, and its message is acknowledged.
    Catches: a parked waiter the sweep cannot call back (it would start when the slot frees),
    or one called back and parked again before its verdict."""
    workers.start(pool="prefork", concurrency=3, PARK="1")
    busy = client.send_task("t.sleeper", ("busy", 1.5))
    wait_until(lambda: started(probe, prefix, "sleepy"), 30, what="the busy task to start")
    late = client.send_task("t.impatient", ("later",))
    env = envelope(client, late)
    assert env.error is not None and env.error.kind == "rejected", env
    wait_until(
        lambda: not unacknowledged(probe, [late.id]) and not queued(probe, prefix, [late.id]),
        10,
        what="the rejected message to be acknowledged",
    )
    assert envelope(client, busy).ok
    assert started(probe, prefix, "sleepy_policy") == []
    wait_drained(probe, prefix, "sleepy")  # its park mark went with its place in line


def test_with_throttle_park_off_nothing_is_parked(
    workers: Workers, client: Celery, probe, prefix: str
):
    """Given ``throttle_park=False`` (the default, set here explicitly), when a backlog waits
    for the only slot of "fragile" on a worker with idle processes, then no waiter is ever
    parked (nor marked parked by its acquire), and all of them run in order. Catches: the setting
    ignored."""
    worker = workers.start(pool="prefork", concurrency=4, PARK="0")
    _never_parked(worker, client, probe, prefix)


def test_on_a_worker_with_celery_time_limits_for_every_task_nothing_is_parked(
    workers: Workers, client: Celery, probe, prefix: str
):
    """Given ``throttle_park=True`` on a worker whose tasks all carry Celery's soft time limit
    (``task_soft_time_limit``), when a backlog waits for the only slot of "fragile", then no
    waiter is parked (nor marked), the worker says why once, and all of them run in order.
    Catches: parking that ignores the worker's own time limits (a parked job goes to the pool
    without them), or turns itself off without a word."""
    worker = workers.start(pool="prefork", concurrency=4, PARK="1", SOFT_TIME_LIMIT=60)
    _never_parked(worker, client, probe, prefix)
    assert worker.output().count("Celery time limits are set for every task") == 1


def _never_parked(worker: Worker, client: Celery, probe: redis.Redis, prefix: str) -> None:
    """Four tasks wait in turn for the only slot of "fragile" on ``worker`` (four processes):
    none is ever parked or marked parked (sampled), and all run, in order, one at a time."""
    results = [client.send_task("t.survivor", (f"x{i}", 0.3)) for i in range(4)]
    marks = Family.of(prefix, "fragile").parked
    seen, marked, deadline = 0, 0, time.monotonic() + 30
    while not all(r.ready() for r in results) and time.monotonic() < deadline:  # sampled
        seen = max(seen, parked(probe, worker))
        marked = max(marked, int(probe.hlen(marks)))
        time.sleep(0.01)
    assert (seen, marked) == (0, 0)
    assert [r.get(timeout=30) for r in results] == [f"x{i}" for i in range(4)]
    assert peak(probe, prefix, "fragile") == 1


def test_a_waiter_with_a_celery_time_limit_is_not_parked_and_keeps_its_limit(
    workers: Workers, client: Celery, probe, prefix: str
):
    """Given a prefork worker with parking on, two idle processes and the only slot of
    "fragile" held, when a task sent with Celery's ``time_limit=1`` (its body would take 4 s)
    waits for the slot longer than that limit, then it is never parked, and once granted its
    body starts and is stopped by the limit, counted from its start: a ``hard_timeout``
    envelope. Catches: a waiter parked whatever its Celery time limits (a parked job goes to
    the pool without them: the body would run its 4 s and succeed)."""
    worker = workers.start(pool="prefork", concurrency=3, PARK="1")
    first = client.send_task("t.survivor", ("first", 0, True))  # runs until released
    wait_until(lambda: labels(probe, prefix, "fragile") == ["first"], 30, what="the first task")
    limited = client.send_task("t.survivor", ("limited", 4), time_limit=1)
    wait_until(
        lambda: leases(probe, prefix, "fragile") == {"holders": 1, "waiters": 1},
        15,
        what="the limited one to wait in line",
    )
    waited_from = time.monotonic()
    while time.monotonic() - waited_from < 1.5:  # its limit passes while it waits
        assert parked(probe, worker) == 0
        time.sleep(0.05)
    probe.rpush(f"{prefix}:probe:release", "first")
    assert first.get(timeout=30) == "first"
    env = envelope(client, limited, timeout=30)
    assert (env.ok, env.error.kind if env.error else None) == (False, "hard_timeout")
    assert labels(probe, prefix, "fragile") == ["first", "limited"]  # it started, then stopped
    assert peak(probe, prefix, "fragile") == 1
    wait_drained(probe, prefix, "fragile")


def _parked_processes(probe: redis.Redis, children: list[int]) -> list[int]:
    """The pool processes blocked on a park list (Redis's CLIENT LIST: blocked, in BLPOP)."""
    blocked = {
        client["addr"]
        for client in probe.client_list()
        if client.get("cmd") == "blpop" and "b" in client.get("flags", "")
    }
    return [pid for pid in children if _connects_from(pid, blocked)]


def _connects_from(pid: int, addresses: set[str]) -> bool:
    """Whether process ``pid`` owns a TCP connection from one of ``addresses`` (from /proc)."""
    ports = {int(a.rsplit(":", 1)[1]) for a in addresses if a}
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if fields[9] in inodes and port in ports:
                return True
    return False


def test_a_parked_hand_off_costs_one_blpop_and_no_script_call_of_its_own(
    private_redis: RedisServer, workers: Workers, client: Celery, probe, prefix: str
):
    """Given a prefork worker with parking on, whose limiter is a Redis of this test's own,
    when 20 tasks wait in turn for the only slot of "fragile", then their hand-offs were parked
    (a BLPOP each, on the limiter) and, once every worker's own release has reached Redis, the
    limiter ran fewer than 2.5 script calls per task: the acquire, which marked the waiter
    parked as it put it in line, and the pool process's release. Catches: a first park that
    marks the holder itself with park.lua (3 script calls per parked task)."""
    workers.start(
        pool="prefork", concurrency=3, PARK="1", LIMITER_URL=private_redis.url, LEASE_TTL=6
    )
    limiter = redis.Redis.from_url(private_redis.url)
    ended = Family.of(prefix, "fragile").ended

    def blpops() -> int:
        return int(limiter.info("commandstats").get("cmdstat_blpop", {}).get("calls", 0))

    assert client.send_task("t.survivor", ("warm-up", 0)).get(timeout=30) == "warm-up"
    wait_until(lambda: not limiter.exists(ended), 15, what="the warm-up's release to reach Redis")
    before, parks = script_calls(limiter), blpops()
    results = [client.send_task("t.survivor", (f"x{i}", 0.05)) for i in range(20)]
    assert [r.get(timeout=60) for r in results] == [f"x{i}" for i in range(20)]
    wait_until(lambda: not limiter.exists(ended), 15, what="every worker's release to reach Redis")
    assert blpops() - parks >= 10
    assert (script_calls(limiter) - before) / 20 < 2.5
    assert peak(probe, prefix, "fragile") == 1
    wait_drained(limiter, prefix, "fragile")
