"""Soft and hard timeouts on every pool, and deadlines owned by the caller."""

from __future__ import annotations

import time

import pytest
from celery import Celery

from .conftest import Workers, wait_until
from .probes import finished, started, wait_drained
from .test_envelope import envelope

pytestmark = pytest.mark.timeout(240)
POOLS = ["prefork", "threads", "solo"]


def concurrency(pool: str) -> int:
    return 1 if pool == "solo" else 3


@pytest.mark.parametrize("pool", POOLS)
def test_soft_timeout_raises_inside_the_task(workers: Workers, client: Celery, pool: str):
    workers.start(pool=pool, concurrency=concurrency(pool))
    # When a task runs past its soft time limit without catching it
    sent = time.time()
    env = envelope(client, client.send_task("t.sleeper", ("s", 5), soft_time_limit=0.5))
    # Then the caller gets a soft_timeout envelope, long before the task would have ended
    assert env.error is not None and env.error.kind == "soft_timeout", env
    assert env.error.type == "billiard.exceptions.SoftTimeLimitExceeded"  # celery re-exports it
    assert env.runtime is not None and 0.3 < env.runtime < 2.5
    assert time.time() - sent < 4.5
    # And a task that catches it runs its cleanup and returns normally
    caught = envelope(
        client, client.send_task("t.sleeper", ("c", 5, 0.01, True), soft_time_limit=0.5)
    )
    assert caught.ok and caught.value == "cleaned up"


@pytest.mark.parametrize("pool", POOLS)
def test_hard_timeout_reports_at_the_limit_and_keeps_the_cap(
    workers: Workers, client, probe, prefix, pool: str
):
    worker = workers.start(pool=pool, concurrency=concurrency(pool))
    # When a task holding the only slot of "sleepy" passes its hard time limit
    sent = time.time()
    slow = client.send_task("t.sleeper", ("slow", 4), time_limit=0.5)
    nxt = client.send_task("t.sleeper", ("next", 0))
    env = envelope(client, slow)
    reported = time.time()
    # Then the caller hears of it at the limit, not when the code ends
    assert env.error is not None and env.error.kind == "hard_timeout", env
    assert reported - sent < 3.5
    assert envelope(client, nxt).ok
    starts = dict(started(probe, prefix, "sleepy"))
    if pool == "prefork":
        # the child was killed and replaced: the slot came back at once
        assert starts["next"] < starts["slow"] + 3.5
    else:
        # a thread cannot be killed: the slot stayed taken until the code returned
        ends = dict(finished(probe, prefix, "sleepy"))
        assert starts["next"] >= ends["slow"]
        assert "cannot kill it" in worker.output()
        # and the late outcome was discarded: the stored envelope is still the hard timeout
        late = envelope(client, slow)
        assert late.error is not None and late.error.kind == "hard_timeout"
    wait_drained(probe, prefix, "sleepy")
    assert worker.alive()


def test_deadline_passed_while_queued_never_runs(workers: Workers, client, probe, prefix):
    # Given a task with a 0.3 s deadline and no worker yet
    sent = time.time()
    late = client.send_task("t.sleeper", ("late", 0), headers={"throttle_deadline": sent + 0.3})
    wait_until(lambda: time.time() > sent + 0.3, 5, what="the deadline to pass")
    # When a worker finally takes it
    workers.start(pool="threads", concurrency=2)
    env = envelope(client, late)
    # Then it settles as "deadline" without running
    assert env.error is not None and env.error.kind == "deadline", env
    assert "while it was queued" in env.error.message
    assert started(probe, prefix, "sleepy") == []


@pytest.mark.parametrize("park", ["0", "1"])
def test_deadline_passed_while_waiting_for_a_slot(workers: Workers, client, probe, prefix, park):
    """Given a prefork worker (its waiters parked in idle processes or not), when a task whose
    caller's deadline is 0.4 s away waits 1.5 s for the slot, then it never runs: a
    ``deadline`` envelope, with parking on as with it off. Catches: a waiter run although its
    deadline passed while it waited (with parking on, a waiter with a deadline is not parked,
    and the sweep would call a parked one back to judge it)."""
    workers.start(pool="prefork", concurrency=3, PARK=park)
    busy = client.send_task("t.sleeper", ("busy", 1.5))
    wait_until(lambda: started(probe, prefix, "sleepy"), 30, what="the busy task to start")
    waiting = client.send_task(
        "t.sleeper", ("waiting", 0), headers={"throttle_deadline": time.time() + 0.4}
    )
    env = envelope(client, waiting)
    assert env.error is not None and env.error.kind == "deadline", env
    assert "waited for a slot" in env.error.message
    assert envelope(client, busy).ok
    assert [label for label, _ in started(probe, prefix, "sleepy")] == ["busy"]
    wait_drained(probe, prefix, "sleepy")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_deadline_while_running_acts_as_soft_timeout(workers: Workers, client, pool):
    workers.start(pool=pool, concurrency=2)
    env = envelope(
        client,
        client.send_task("t.sleeper", ("d", 5), headers={"throttle_deadline": time.time() + 1.0}),
    )
    assert env.error is not None and env.error.kind == "deadline", env
    assert env.runtime is not None and env.runtime < 3


def test_deadline_flows_down_to_child_tasks(workers: Workers, client):
    workers.start(pool="threads", concurrency=4)
    parent_deadline = time.time() + 60
    # A child submitted from inside a throttled task inherits the parent's deadline
    env = envelope(
        client, client.send_task("t.spawn", (), headers={"throttle_deadline": parent_deadline})
    )
    assert env.ok and env.value["mine"] == pytest.approx(parent_deadline)
    child = envelope(client, client.AsyncResult(env.value["child_id"]))
    assert child.ok and child.value == pytest.approx(parent_deadline)
    # unless the child asks for an earlier one
    env = envelope(
        client, client.send_task("t.spawn", (5,), headers={"throttle_deadline": parent_deadline})
    )
    child = envelope(client, client.AsyncResult(env.value["child_id"]))
    assert child.ok and child.value < parent_deadline - 30
    # and a later one does not extend it
    env = envelope(
        client, client.send_task("t.spawn", (600,), headers={"throttle_deadline": parent_deadline})
    )
    child = envelope(client, client.AsyncResult(env.value["child_id"]))
    assert child.ok and child.value == pytest.approx(parent_deadline)
