"""errgroup promises on real workers: both caps at once, cancelling members that wait, the
first error before the end, the errback of an explicit cancel, a child group whose parent task
failed, members refused, and a member that arrives after the group's state expired."""

from __future__ import annotations

import json
import time
from types import ModuleType

import pytest
import redis
from celery import Celery, chain

from celery_throttled import ConfigurationError, Envelope, ErrgroupResult, errgroup
from celery_throttled.keys import ERRGROUP_KEY_PREFIX, GroupKeys

from .conftest import Workers, holds_for, wait_until
from .probes import leases, peak, started
from .test_envelope import envelope

pytestmark = pytest.mark.timeout(240)
QUIET = 1.0


def sig(client: Celery, name: str, *args, **kwargs):
    return client.signature(name, args=args, kwargs=kwargs)


def test_a_members_own_cap_applies_within_the_groups_limit(
    workers: Workers, client: Celery, tasks: ModuleType, probe: redis.Redis, prefix: str
):
    """Given an errgroup of 6 tasks capped at 2 by their own key, with the group's limit at 4,
    then 4 members hold the group's slots but only 2 run at once, and all 6 succeed. Catches: a
    member admitted on the group's slot alone, its own cap ignored."""
    workers.start(pool="prefork", concurrency=6)
    res = errgroup(
        [sig(client, "t.limited", f"g{i}", 0.4) for i in range(6)], limit=4
    ).apply_async()
    group_key = ERRGROUP_KEY_PREFIX + res.id
    wait_until(
        lambda: (
            leases(probe, prefix, group_key)["holders"] == 4
            and leases(probe, prefix, "t.limited") == {"holders": 2, "waiters": 2}
        ),
        15,
        what="4 group slots held, 2 running and 2 waiting for their own cap",
    )
    assert res.unwrap(timeout=60) == [f"g{i}" for i in range(6)]
    assert peak(probe, prefix, "limited") == 2


def test_cancelling_members_that_wait_for_their_own_slot(
    workers: Workers, client: Celery, tasks: ModuleType, probe: redis.Redis, prefix: str
):
    """Given an errgroup whose two members hold the group's slots and wait for their own key's
    slots (held by two tasks outside the group), when the caller cancels the group, then both
    settle as cancelled without running and leave both lines at once (while the other tasks
    still run), they never start later, and the errback gets the first member it cancelled, as
    JSON an Envelope reads back. Catches: a cancelled member kept in its line until a slot frees,
    and an errback missing (or with another payload) after an explicit cancel."""
    workers.start(pool="prefork", concurrency=4)
    blockers = [client.send_task("t.limited", (f"b{i}", 3.0)) for i in range(2)]
    wait_until(lambda: len(started(probe, prefix, "limited")) == 2, 30, what="2 blockers")
    members = [sig(client, "t.limited", f"g{i}", 0.0) for i in range(2)]
    res = errgroup(members, limit=2).on_error(sig(client, "t.report_error")).apply_async()
    group_key = ERRGROUP_KEY_PREFIX + res.id
    wait_until(
        lambda: (
            leases(probe, prefix, group_key)["holders"] == 2
            and leases(probe, prefix, "t.limited")["waiters"] == 2
        ),
        30,
        what="both members waiting for their own slot",
    )
    # When the caller cancels it
    assert res.cancel() is True
    envs = res.get(timeout=10)
    # Then both settle as cancelled without running, and leave both lines at once
    assert all(e.error is not None and e.error.kind == "cancelled" for e in envs), envs
    assert all("never ran" in e.error.message for e in envs if e.error is not None)
    wait_until(
        lambda: (
            leases(probe, prefix, "t.limited") == {"holders": 2, "waiters": 0}
            and leases(probe, prefix, group_key) == {"holders": 0, "waiters": 0}
        ),
        5,
        what="the members to leave both lines",
    )
    assert not any(b.ready() for b in blockers), "the lines emptied only when the blockers ended"
    # And the errback got the first member it cancelled
    key = f"{prefix}:probe:eg:errback"
    wait_until(lambda: probe.llen(key) == 1, 30, what="the errback")
    payload = Envelope.from_json(json.loads(str(probe.lindex(key, 0))))
    assert payload.task_id == res.member_ids[0]
    assert payload.error is not None and payload.error.kind == "cancelled"
    # And once the slots free, neither starts
    assert sorted(b.get(timeout=30) for b in blockers) == ["b0", "b1"]
    holds_for(
        lambda: sorted(label for label, _ in started(probe, prefix, "limited")) == ["b0", "b1"],
        QUIET,
        what="no cancelled member starts",
    )
    assert probe.llen(key) == 1


def test_a_member_already_handed_to_the_pool_never_starts_once_cancelled(
    workers: Workers, client: Celery, tasks: ModuleType, probe: redis.Redis, prefix: str
):
    """Given a prefork worker whose one pool process is busy, and an errgroup member that was
    granted its slot and handed to the pool (queued for that process), when the group is
    cancelled, then the member settles as cancelled and never starts once the process frees.
    Catches: a start step that does not check the cancellation atomically (the gate cannot
    take back a request it already dispatched)."""
    workers.start(pool="prefork", concurrency=1, PREFETCH=4)
    hog = client.send_task("t.plain", ("hog", 1.5))
    wait_until(lambda: started(probe, prefix, "plain"), 30, what="the hog to start")
    res = errgroup([sig(client, "t.member", "m0", 0.1)]).apply_async()
    wait_until(lambda: leases(probe, prefix, "members")["holders"] == 1, 10,
               what="the member to be granted its slot")  # fmt: skip
    assert res.cancel() is True
    (env,) = res.get(timeout=10)
    assert env.error is not None and env.error.kind == "cancelled", env
    assert hog.get(timeout=30) == "hog"
    holds_for(lambda: started(probe, prefix, "eg") == [], QUIET, what="the member never starts")
    wait_until(lambda: leases(probe, prefix, "members") == {"holders": 0, "waiters": 0}, 10,
               what="its slot to be released")  # fmt: skip


def test_first_error_is_readable_before_the_group_settles(
    workers: Workers, client: Celery, tasks: ModuleType, probe: redis.Redis, prefix: str
):
    """Given an errgroup whose first member fails at once while two siblings run 3 s without
    looking at their context, then ``first_error`` names the failure while the group has not
    settled yet. Catches: a first error recorded only when the last member settles."""
    workers.start(pool="threads", concurrency=4)
    members = [sig(client, "t.member", "f", 1.0, fail_after=0.05)] + [
        sig(client, "t.member", f"s{i}", 3.0, poll=False) for i in range(2)
    ]
    res = errgroup(members).apply_async()
    first = wait_until(lambda: res.first_error, 10, what="the first error")
    assert not res.ready()
    assert first.task_id == res.member_ids[0]
    assert first.error is not None and first.error.kind == "error"
    assert "member f failed" in first.error.message
    envs = res.get(timeout=30)
    assert [e.ok for e in envs] == [False, True, True]  # they never looked at their context


def test_a_child_errgroup_is_cancelled_when_the_task_that_started_it_fails(
    workers: Workers, client: Celery, tasks: ModuleType, probe: redis.Redis, prefix: str
):
    """Given a throttled task (not itself an errgroup member) that starts an errgroup of 30 s
    members and then fails, then the child group is cancelled, saying its parent task did not
    succeed (not that a parent errgroup was cancelled), and its members stop long before 30 s.
    Catches: a failed task that does not cancel the errgroups it started."""
    workers.start(pool="prefork", concurrency=6)
    sent = time.time()
    parent = client.send_task("t.nest_then_fail", (["k1", "k2", "k3"], 30.0))
    env = envelope(client, parent)
    assert env.error is not None and "the parent task failed" in env.error.message
    child_id = wait_until(lambda: probe.get(f"{prefix}:probe:eg:child"), 10, what="the child id")
    child = ErrgroupResult.from_id(child_id, app=client)
    child_envs = child.get(timeout=15)
    assert all(e.error is not None and e.error.kind == "cancelled" for e in child_envs), child_envs
    reason = probe.hget(GroupKeys.of(prefix, child_id).state, "cancelled")
    assert reason == f"task {parent.id}, which started it, did not succeed"
    assert time.time() - sent < 15


def test_chains_and_members_without_results_are_refused(client: Celery, tasks: ModuleType):
    """Given a chain, a task declared with ``ignore_result=True``, and a signature asking to
    ignore its result, then building the errgroup fails with a ConfigurationError naming the
    member. Catches: a member whose envelope would never be stored, so its group never
    settles."""
    a, b = sig(client, "t.member", "a"), sig(client, "t.member", "b")
    with pytest.raises(ConfigurationError, match=r"member 1: expected the signature"):
        errgroup([a, chain(a, b)])
    with pytest.raises(ConfigurationError, match=r"member 1: task 't\.quiet' ignores its result"):
        errgroup([a, sig(client, "t.quiet", "q")])
    with pytest.raises(ConfigurationError, match=r"member 0: task 't\.member' ignores its result"):
        errgroup([sig(client, "t.member", "c").set(ignore_result=True)])


def test_a_member_arriving_after_the_groups_state_expired_runs_untracked(
    workers: Workers, client: Celery, tasks: ModuleType, probe: redis.Redis, prefix: str
):
    """Given an errgroup sent with ``throttle_errgroup_ttl=1`` and no worker until its state has
    expired, when a worker takes its members, then they run anyway (untracked) and the worker
    warns about each. Catches: members dropped or failed because their group is unknown."""
    client.conf.throttle_errgroup_ttl = 1
    res = errgroup([sig(client, "t.member", f"m{i}", 0.0) for i in range(2)]).apply_async()
    wait_until(
        lambda: not probe.exists(GroupKeys.of(prefix, res.id).state),
        10,
        what="the group's state to expire",
    )
    worker = workers.start(pool="threads", concurrency=2)
    envs = [envelope(client, r) for r in res.results]
    assert [e.value for e in envs] == ["m0", "m1"], envs
    assert worker.output().count("which Redis no longer knows") == 2
