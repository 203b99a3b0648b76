"""The cluster-wide cap, measured inside the tasks, with real Redis and real worker processes."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from celery import Celery

from celery_throttled.keys import Family

from .conftest import RedisServer, Workers, wait_until
from .probes import finished, leases, peak, reported, script_calls, started, wait_drained

pytestmark = pytest.mark.timeout(240)


def run_all(
    client: Celery, name: str, args_list: list[tuple[Any, ...]], timeout: float = 60
) -> list[Any]:
    results = [client.send_task(name, args) for args in args_list]
    return [r.get(timeout=timeout) for r in results]


@pytest.mark.parametrize(
    "pools",
    [("prefork", "prefork"), ("threads", "threads"), ("solo", "solo"), ("prefork", "threads")],
    ids=lambda p: "+".join(p),
)
def test_cap_holds_across_two_workers(workers: Workers, client: Celery, probe, prefix, pools):
    # Given two workers with room for far more than the cap of 2
    for pool in pools:
        workers.start(pool=pool, concurrency=1 if pool == "solo" else 4)
    # When 16 capped tasks are submitted at once
    labels = run_all(client, "t.limited", [(f"x{i}", 0.15) for i in range(16)])
    # Then every one ran, and never more than 2 at a time, and the cap was used in full
    assert labels == [f"x{i}" for i in range(16)]
    assert peak(probe, prefix, "limited") == 2
    # And nothing is left in Redis
    wait_drained(probe, prefix, "t.limited")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_the_slot_is_free_as_the_body_ends_not_when_the_worker_hears_of_it(
    workers: Workers, client: Celery, probe, prefix, pool
):
    """Given a task at cap 1 whose process spends a second after its body (after the result is
    stored, before the worker's main process hears of the end), when two run, then the second
    starts while the first's process is still in that second, and never beside its body.
    Catches: the slot freed only by the main process's end path (after the result is stored
    and piped back), or freed before the body ended."""
    workers.start(pool=pool, concurrency=2)
    first = client.send_task("t.handover", ("a", 0.3))
    wait_until(lambda: started(probe, prefix, "handover"), 30, what="the first body to start")
    second = client.send_task("t.handover", ("b", 0.05))
    assert [first.get(timeout=30), second.get(timeout=30)] == ["a", "b"]
    wait_until(lambda: len(reported(probe, prefix, "handover")) == 2, 30, what="both reports")
    begun = dict(started(probe, prefix, "handover"))
    ended = dict(finished(probe, prefix, "handover"))
    assert ended["a"] <= begun["b"] < dict(reported(probe, prefix, "handover"))["a"]
    assert peak(probe, prefix, "handover") == 1
    wait_drained(probe, prefix, "handover")


def test_a_task_costs_two_script_calls_its_workers_release_rides_in_the_renewals(
    private_redis: RedisServer, workers: Workers, client: Celery, probe, prefix
):
    """Given a worker whose limiter is a Redis of this test's own, renewing every 2 s, when
    60 capped tasks run and every worker's own release has reached Redis (no ended mark is left),
    then the limiter ran fewer than 2.5 script calls per task: the acquire and the pool
    process's release, the worker's safety-net releases riding in its renewals. Catches: that
    safety net sent as a script call of its own per task (3 per task)."""
    workers.start(pool="prefork", concurrency=4, LIMITER_URL=private_redis.url, LEASE_TTL=6)
    limiter = redis.Redis.from_url(private_redis.url)
    ended = Family.of(prefix, "t.limited").ended

    def settled() -> bool:
        return not limiter.exists(ended)

    assert run_all(client, "t.limited", [("warm-up", 0)]) == ["warm-up"]
    wait_until(settled, 15, what="the warm-up's release to reach Redis")
    before = script_calls(limiter)
    labels = run_all(client, "t.limited", [(f"x{i}", 0.01) for i in range(60)])
    assert labels == [f"x{i}" for i in range(60)]
    wait_until(settled, 15, what="every worker's release to reach Redis")
    assert (script_calls(limiter) - before) / 60 < 2.5
    assert peak(probe, prefix, "limited") == 2
    wait_drained(limiter, prefix, "t.limited")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_cap_far_from_binding_costs_one_script_call_and_frees_its_slots_without_the_round(
    private_redis: RedisServer, workers: Workers, client: Celery, probe, prefix, pool
):
    """Given a worker whose limiter is a Redis of this test's own, renewing every 20 s, and a
    cap of 1000 that four processes never come near, when 60 tasks run, then the limiter ran
    fewer than 1.5 script calls per task (the acquire; each release rides in a later acquire,
    the pool process leaving it to the worker), and every slot is free again long before the
    next renewal round. Catches: the pool process releasing every slot of a cap nobody waits
    on (2 calls per task), or the worker's releases kept for the round (slots held 20 s)."""
    workers.start(pool=pool, concurrency=4, LIMITER_URL=private_redis.url, LEASE_TTL=60)
    limiter = redis.Redis.from_url(private_redis.url)
    assert run_all(client, "t.wide", [("warm-up",)]) == ["warm-up"]
    wait_drained(limiter, prefix, "wide")
    before = script_calls(limiter)
    labels = run_all(client, "t.wide", [(f"x{i}",) for i in range(60)])
    assert labels == [f"x{i}" for i in range(60)]
    wait_drained(limiter, prefix, "wide", timeout=10)
    assert (script_calls(limiter) - before) / 60 < 1.5


def test_shared_key_caps_two_task_types_together(workers: Workers, client, probe, prefix):
    # Given two task types declared with key="shared-downstream" and limit=2
    workers.start(pool="prefork", concurrency=6)
    # When six of each are submitted together
    a = [client.send_task("t.shared_a", (f"a{i}", 0.15)) for i in range(6)]
    b = [client.send_task("t.shared_b", (f"b{i}", 0.15)) for i in range(6)]
    for r in a + b:
        r.get(timeout=60)
    # Then at most two of either kind ran at once
    assert peak(probe, prefix, "shared") == 2


def test_key_function_caps_each_value_separately(workers: Workers, client, probe, prefix):
    # Given a task capped at 1 per tenant
    workers.start(pool="threads", concurrency=6)
    # When three tenants each submit three tasks
    results = [
        client.send_task("t.per_tenant", (t, f"{t}{i}", 0.3)) for i in range(3) for t in "ABC"
    ]
    for r in results:
        r.get(timeout=60)
    # Then each tenant ran one at a time ...
    for tenant in "ABC":
        assert peak(probe, prefix, f"tenant:{tenant}") == 1
    # ... while different tenants ran side by side
    runs = []
    for t in "ABC":
        ends = dict(finished(probe, prefix, f"tenant:{t}"))
        runs += [(t, s, ends[label]) for label, s in started(probe, prefix, f"tenant:{t}")]
    overlapping = [
        (a, b) for a in runs for b in runs if a[0] < b[0] and a[1] < b[2] and b[1] < a[2]
    ]
    assert len(overlapping) >= 3, runs


def test_unthrottled_tasks_flow_past_a_throttled_backlog(workers: Workers, client, probe, prefix):
    # Given a worker whose queue holds a long throttled backlog (12 x 0.5 s at limit 2)
    workers.start(pool="prefork", concurrency=4)
    backlog = [client.send_task("t.limited", (f"x{i}", 0.5)) for i in range(12)]
    wait_until(lambda: peak(probe, prefix, "limited") == 2, 30, what="the backlog to start")
    # When plain tasks are submitted behind it on the same queue
    plain = [client.send_task("t.plain", (f"p{i}", 0.05)) for i in range(10)]
    for r in plain:
        r.get(timeout=60)
    # Then they all finished while the backlog was still far from done
    done_plain = max(f for _, f in finished(probe, prefix, "plain"))
    done_limited_before = [f for _, f in finished(probe, prefix, "limited") if f < done_plain]
    assert len(done_limited_before) < 8
    for r in backlog:
        r.get(timeout=60)
    assert peak(probe, prefix, "limited") == 2


def test_killed_child_frees_its_slot_at_once(workers: Workers, client, probe, prefix):
    # Given leases that would take two minutes to expire on their own
    workers.start(pool="prefork", concurrency=2, LEASE_TTL=120)
    # When a task holding the only slot of "fragile" SIGKILLs its own pool process
    dead = client.send_task("t.suicide", ("boom",))
    wait_until(lambda: started(probe, prefix, "suicide"), 30, what="the suicide task to start")
    # Then the next task of the same key runs long before the lease could have expired
    assert client.send_task("t.survivor", ("after",)).get(timeout=30) == "after"
    assert dead.state == "FAILURE"
    wait_drained(probe, prefix, "fragile")


def test_revoked_held_task_never_runs(workers: Workers, client, probe, prefix):
    # Given the only slot of "fragile" taken by a running task
    workers.start(pool="prefork", concurrency=3)
    first = client.send_task("t.survivor", ("first", 1.5))
    wait_until(lambda: started(probe, prefix, "fragile"), 30, what="the first task to start")
    # When a second task waits for the slot and is revoked while it waits
    held = client.send_task("t.survivor", ("held", 0))
    wait_until(
        lambda: leases(probe, prefix, "fragile")["waiters"] == 1, 10, what="the second task to wait"
    )
    client.control.revoke(held.id)
    # Then it settles as revoked and leaves the line at once, the running task is unaffected,
    wait_until(lambda: held.state == "REVOKED", 10, what="the held task to be revoked")
    wait_until(
        lambda: leases(probe, prefix, "fragile") == {"holders": 1, "waiters": 0},
        5,
        what="the revoked task to leave the line",
    )
    assert first.get(timeout=30) == "first"
    # and the slot serves the next task normally
    assert client.send_task("t.survivor", ("third", 0)).get(timeout=30) == "third"
    assert [label for label, _ in started(probe, prefix, "fragile")] == ["first", "third"]
    wait_drained(probe, prefix, "fragile")


def test_bad_key_function_fails_the_task_and_the_worker_carries_on(
    workers: Workers, client, probe, prefix
):
    # Given a worker
    worker = workers.start(pool="prefork", concurrency=2)
    # When a task's key function raises, and another's returns a non-string
    raising = client.send_task("t.bad_key", ("a",))
    wrong = client.send_task("t.non_string_key", ("b",))
    # Then both fail without running, with errors that say what happened
    with pytest.raises(Exception, match=r"key function .* raised ZeroDivisionError"):
        raising.get(timeout=30)
    with pytest.raises(Exception, match="returned 42"):
        wrong.get(timeout=30)
    assert started(probe, prefix, "bad_key") == []
    assert started(probe, prefix, "non_string_key") == []
    # And the worker still serves throttled tasks
    assert client.send_task("t.limited", ("ok", 0)).get(timeout=30) == "ok"
    assert worker.alive()


def test_fifo_within_a_worker_and_no_worker_starves(workers: Workers, client, probe, prefix):
    # Given two workers sharing a cap of 1
    names = [workers.start(pool="threads", concurrency=4).name for _ in range(2)]
    # When 24 tasks are submitted in order
    results = [client.send_task("t.fair", (i, 0.03)) for i in range(24)]
    for r in results:
        r.get(timeout=60)
    runs = [label.split("@", 1) for label, _ in started(probe, prefix, "fair")]
    # Then each worker started its tasks in the order they were submitted
    for name in names:
        mine = [int(index) for index, host in runs if host == name]
        assert mine == sorted(mine)
        # and neither worker was starved by the other
        assert len(mine) >= 6, (name, mine)
    assert peak(probe, prefix, "fair") == 1


def test_hard_time_limit_and_terminate_free_the_slot(workers: Workers, client, probe, prefix):
    # Given leases that would take two minutes to expire on their own
    workers.start(pool="prefork", concurrency=3, LEASE_TTL=120)
    # When a task that holds the only slot hits its hard time limit
    slow = client.send_task("t.survivor", ("slow", 30), time_limit=0.5)
    # Then the next one runs, long before the slow one could have finished
    assert client.send_task("t.survivor", ("next", 0)).get(timeout=20) == "next"
    assert slow.state == "FAILURE"
    # When a running task is revoked with terminate=True
    stuck = client.send_task("t.survivor", ("stuck", 30))
    wait_until(
        lambda: "stuck" in [label for label, _ in started(probe, prefix, "fragile")],
        20,
        what="the stuck task to start",
    )
    client.control.revoke(stuck.id, terminate=True)
    # Then its slot is freed too
    assert client.send_task("t.survivor", ("after", 0)).get(timeout=20) == "after"
    wait_until(lambda: stuck.state == "REVOKED", 10, what="the stuck task to be revoked")
    wait_drained(probe, prefix, "fragile")
