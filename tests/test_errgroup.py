"""errgroup: the first error cancels the siblings; body and errback run exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import redis
from celery import Celery

from celery_throttled import ConfigurationError, TaskError, ThrottledTask, errgroup
from celery_throttled.keys import GroupKeys

from .conftest import ROOT, Workers, holds_for, wait_until
from .probes import finished, peak, started

pytestmark = pytest.mark.timeout(240)
#: how long a member that was not started must stay so (several sweeps and cancel probes)
QUIET = 1.0


def sig(client: Celery, name: str, *args, **kwargs):
    return client.signature(name, args=args, kwargs=kwargs)


def labels(events: list[tuple[str, float]]) -> set[str]:
    return {label for label, _ in events}


def test_first_error_cancels_members_not_started_and_running(
    workers: Workers, client: Celery, tasks, probe: redis.Redis, prefix: str
):
    workers.start(pool="prefork", concurrency=4)
    # Given sixteen members at limit 4: member 1 fails after 0.3 s, the others work for 2 s
    # and poll current_context() like a goroutine selecting on ctx.Done()
    members = [sig(client, "t.member", f"m{i}", 2.0) for i in range(16)]
    members[1] = sig(client, "t.member", "m1", 2.0, fail_after=0.3)
    res = errgroup(members, limit=4).apply_async()
    envs = res.get(timeout=60)
    settled_at = time.time()
    failed_at = dict(finished(probe, prefix, "eg"))["m1"]
    # Then the result settles within 1 s of the failure
    assert settled_at - failed_at < 1.0, settled_at - failed_at
    # And the members that had not started never started (as Redis counted them)
    ran = started(probe, prefix, "eg")
    assert "m1" in labels(ran)
    assert len(ran) <= 4, ran
    assert all(at <= failed_at for _, at in ran), ran
    assert probe.scard(GroupKeys.of(prefix, res.id).started) == len(ran)
    # and none starts late either (a member held by a worker, or still in the broker)
    holds_for(lambda: started(probe, prefix, "eg") == ran, QUIET, what="no late start")
    # And every member has an envelope: the error, and "cancelled" for all the others
    assert [e.task_id for e in envs] == res.member_ids
    assert envs[1].error is not None and envs[1].error.kind == "error", envs[1]
    assert "member m1 failed" in envs[1].error.message
    for index, env in enumerate(envs):
        if index == 1:
            continue
        assert env.error is not None and env.error.kind == "cancelled", (index, env)
        if f"m{index}" not in labels(ran):
            assert "never ran" in env.error.message
    # And the first error is readable, and unwrap raises it
    assert res.first_error is not None and res.first_error.task_id == res.member_ids[1]
    with pytest.raises(TaskError, match="member m1 failed"):
        res.unwrap(timeout=5)


def test_terminate_stops_running_members_on_prefork(
    workers: Workers, client: Celery, tasks, probe: redis.Redis, prefix: str
):
    workers.start(pool="prefork", concurrency=4)
    # Given members that never look at their context (they would run 20 s), one failing
    members = [sig(client, "t.member", f"m{i}", 20.0, poll=False) for i in range(8)]
    members[2] = sig(client, "t.member", "m2", 20.0, fail_after=0.5, poll=False)
    res = errgroup(members, limit=4, terminate=True).apply_async()
    wait_until(lambda: len(started(probe, prefix, "eg")) == 4, 30, what="4 members to start")
    envs = res.get(timeout=30)
    settled_at = time.time()
    failed_at = dict(finished(probe, prefix, "eg"))["m2"]
    # Then the running siblings were stopped, and everything settled within 1 s
    assert settled_at - failed_at < 1.0, settled_at - failed_at
    ran = labels(started(probe, prefix, "eg"))
    assert len(ran) == 4
    holds_for(lambda: len(started(probe, prefix, "eg")) == 4, QUIET, what="no late start")
    for index, env in enumerate(envs):
        label = f"m{index}"
        if label == "m2":
            assert env.error is not None and env.error.kind == "error", env
        elif label in ran:
            assert env.error is not None and env.error.kind == "cancelled", env
            assert "was stopped" in env.error.message, env
        else:
            assert env.error is not None and "never ran" in env.error.message, env
    # And the worker carries on
    assert errgroup([sig(client, "t.member", "after")]).apply_async().unwrap(30) == ["after"]


def test_all_success_runs_the_body_once_with_values_in_member_order(
    workers: Workers, client: Celery, tasks, probe: redis.Redis, prefix: str
):
    workers.start(pool="threads", concurrency=4, name="a")
    workers.start(pool="threads", concurrency=4, name="b")
    # Given six members that finish in reverse order, at most 2 at once across two workers
    members = [sig(client, "t.member", f"v{i}", 0.1 * (6 - i)) for i in range(6)]
    group = errgroup(members, limit=2) | sig(client, "t.summarize")
    res = group.apply_async()
    # Then every envelope is ok, in member order, and the body ran once with the values
    values = res.unwrap(timeout=60)
    assert values == [f"v{i}" for i in range(6)]
    assert res.first_error is None and not res.cancelled
    assert res.body is not None and res.body.get(timeout=30) == 6
    assert [json.loads(b) for b in probe.lrange(f"{prefix}:probe:eg:body", 0, -1)] == [values]
    # And the group's own limit held across both workers, and was reached
    assert peak(probe, prefix, "eg") == 2

    # And everything the group keeps in Redis expires
    def forever() -> list[str]:
        ours = [res.id, *res.member_ids]
        keys = [k for k in probe.scan_iter(match=f"{prefix}:*") if any(i in k for i in ours)]
        assert any(f"{{eg:{res.id}}}" in k for k in keys)
        return [k for k in keys if probe.ttl(k) == -1]

    wait_until(lambda: not forever(), 10, what="every key of the group to have an expiry")


def test_concurrent_failures_send_one_errback(
    workers: Workers, client: Celery, tasks, probe: redis.Redis, prefix: str
):
    workers.start(pool="threads", concurrency=6)
    # Given six members that all fail at the same moment
    members = [sig(client, "t.member", f"f{i}", 1.0, fail_after=0.05) for i in range(6)]
    group = (errgroup(members) | sig(client, "t.summarize")).on_error(sig(client, "t.report_error"))
    res = group.apply_async()
    envs = res.get(timeout=60)
    assert all(not e.ok for e in envs)
    # Then the errback ran exactly once, with the first error; the body never ran
    key = f"{prefix}:probe:eg:errback"
    wait_until(lambda: probe.llen(key) >= 1, 30, what="the errback")
    marker = errgroup([sig(client, "t.member", "marker")]).apply_async()
    assert marker.unwrap(30) == ["marker"]  # the worker has drained what came before
    errbacks = [json.loads(e) for e in probe.lrange(key, 0, -1)]
    assert len(errbacks) == 1, errbacks
    assert res.first_error is not None and errbacks[0]["task_id"] == res.first_error.task_id
    assert errbacks[0]["error"]["kind"] == "error"
    assert probe.llen(f"{prefix}:probe:eg:body") == 0
    assert res.body is not None and res.body.state == "PENDING"


def test_cancel_from_the_caller(workers: Workers, client: Celery, tasks, probe, prefix):
    workers.start(pool="threads", concurrency=2)
    # Given a group of polling members, two running and four waiting on the group's limit
    members = [sig(client, "t.member", f"c{i}", 30.0) for i in range(6)]
    res = errgroup(members, limit=2).on_error(sig(client, "t.report_error")).apply_async()
    wait_until(lambda: len(started(probe, prefix, "eg")) == 2, 30, what="two members to start")
    # When the caller cancels it
    assert res.cancel() is True
    assert res.cancel() is False
    envs = res.get(timeout=10)
    # Then every member settles as cancelled, and nothing else starts
    assert all(e.error is not None and e.error.kind == "cancelled" for e in envs), envs
    assert len(started(probe, prefix, "eg")) == 2
    holds_for(lambda: len(started(probe, prefix, "eg")) == 2, QUIET, what="no late start")
    wait_until(lambda: probe.llen(f"{prefix}:probe:eg:errback") == 1, 30, what="the errback")


def test_cancellation_flows_down_to_nested_errgroups(
    workers: Workers, client: Celery, tasks, probe: redis.Redis, prefix: str
):
    workers.start(pool="prefork", concurrency=6)
    # Given a member that runs a child errgroup of 30 s members, and a sibling that fails
    nest = sig(client, "t.nest", ["k1", "k2", "k3"], 30.0)
    boom = sig(client, "t.member", "boom", 30.0, fail_after=0.5)
    sent = time.time()
    parent = errgroup([nest, boom]).apply_async()
    envs = parent.get(timeout=30)
    # Then the parent's member that was waiting on its child is cancelled
    assert envs[1].error is not None and envs[1].error.kind == "error", envs[1]
    assert envs[0].error is not None and envs[0].error.kind == "cancelled", envs[0]
    # And so is the child errgroup, whose members stop long before their 30 s
    child_id = probe.get(f"{prefix}:probe:eg:child")
    assert child_id is not None
    from celery_throttled import ErrgroupResult

    child = ErrgroupResult.from_id(str(child_id), app=client)
    child_envs = child.get(timeout=10)
    assert child.cancelled
    # by the parent-group path: its parent errgroup was cancelled (the task itself did not fail)
    reason = probe.hget(GroupKeys.of(prefix, str(child_id)).state, "cancelled")
    assert reason is not None and f"its parent errgroup {parent.id} was cancelled" in reason
    assert all(e.error is not None and e.error.kind == "cancelled" for e in child_envs)
    assert time.time() - sent < 15


def test_errgroup_inside_a_task_inherits_its_deadline(workers: Workers, client: Celery, tasks):
    workers.start(pool="prefork", concurrency=4)
    # Given a task with a deadline 60 s away that starts an errgroup
    sent = time.time()
    result = client.tasks["t.nest_deadline"].apply_async((3,), deadline=60)
    env = result.get(timeout=30)
    # Then every member of the errgroup has the task's deadline
    assert env.ok, env
    assert len(set(env.value)) == 1 and sent + 59 < env.value[0] < time.time() + 60


def test_group_completes_after_its_submitter_exits(
    workers: Workers, client: Celery, tasks, probe: redis.Redis, prefix: str, redis_url: str
):
    workers.start(pool="threads", concurrency=4)
    # Given a process that sends an errgroup with a body and exits at once
    script = (
        "from tests.apps.throttle_app import errgroup, member, summarize\n"
        "res = (errgroup([member.s('x', 0.5), member.s('y', 0.2)]) | summarize.s()).apply_async()\n"
        "print(res.id)\n"
    )
    env = {**os.environ, "REDIS_URL": redis_url, "TEST_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    gid = done.stdout.strip().splitlines()[-1]
    # Then the body still runs, once, with both values in member order
    body = f"{prefix}:probe:eg:body"
    wait_until(lambda: probe.llen(body) == 1, 30, what="the body to run")
    assert json.loads(str(probe.lindex(body, 0))) == ["x", "y"]
    from celery_throttled import ErrgroupResult

    assert ErrgroupResult.from_id(gid, app=client).unwrap(10) == ["x", "y"]


def test_a_killed_pool_process_cancels_the_group(
    workers: Workers, client: Celery, tasks, probe: redis.Redis, prefix: str
):
    workers.start(pool="prefork", concurrency=4)
    # Given a member whose pool process dies, beside three 30 s members
    members = [sig(client, "t.member_suicide", "dies")] + [
        sig(client, "t.member", f"s{i}", 30.0) for i in range(3)
    ]
    res = errgroup(members).on_error(sig(client, "t.report_error")).apply_async()
    envs = res.get(timeout=30)
    # Then the death is the first error, and the siblings are cancelled
    assert envs[0].error is not None and envs[0].error.kind == "worker_lost", envs[0]
    assert all(e.error is not None and e.error.kind == "cancelled" for e in envs[1:]), envs
    wait_until(lambda: probe.llen(f"{prefix}:probe:eg:errback") == 1, 30, what="the errback")


def test_a_dead_worker_is_reported_to_its_group_by_a_survivor(
    workers: Workers, client: Celery, tasks, probe: redis.Redis, prefix: str
):
    # Given a solo worker that dies with the member it runs
    doomed = workers.start(pool="solo", concurrency=1, name="doomed", LEASE_TTL=2)
    res = errgroup([sig(client, "t.member_suicide", "dies")]).apply_async()
    wait_until(lambda: not doomed.alive(), 30, what="the doomed worker to die")
    # When another worker runs
    workers.start(pool="threads", concurrency=2, name="survivor", LEASE_TTL=2)
    # Then the group learns of it as worker_lost, once the lease expires
    envs = res.get(timeout=30)
    assert envs[0].error is not None and envs[0].error.kind == "worker_lost", envs[0]
    assert res.first_error is not None


def test_only_throttled_signatures_may_join(client: Celery, tasks):
    with pytest.raises(ConfigurationError, match=r"member 1: task 't.plain' is not a throttled"):
        errgroup([sig(client, "t.member", "a"), sig(client, "t.plain", "b")])
    with pytest.raises(ConfigurationError, match="member 0: expected the signature"):
        errgroup([lambda: None])
    with pytest.raises(ConfigurationError, match="limit must be a positive int"):
        errgroup([sig(client, "t.member", "a")], limit=0)
    with pytest.raises(ConfigurationError, match=r"'t\.nope' is not registered"):
        errgroup([sig(client, "t.nope")])


def test_eager_mode_runs_members_inline_and_stops_at_the_first_error():
    # Given an app in task_always_eager mode (as in a Django or Flask project's own tests)
    app = Celery("eager", set_as_current=False)
    app.conf.task_always_eager = True
    ran: list[int] = []

    @app.task(base=ThrottledTask, throttle_limit=2, name="eager.step")
    def step(i: int) -> int:
        ran.append(i)
        if i == 2:
            raise ValueError("step 2 failed")
        return i * 10

    @app.task(name="eager.total")
    def total(values: list[int]) -> int:
        return sum(values)

    # When every member succeeds, the body gets the values in order
    res = (errgroup([step.s(i) for i in (0, 1)]) | total.s()).apply_async()
    assert res.unwrap() == [0, 10]
    assert res.body is not None and res.body.get() == 10
    # When one fails, the members after it never run and settle as cancelled
    ran.clear()
    res = errgroup([step.s(i) for i in (1, 2, 3)]).apply_async()
    envs = res.get()
    assert ran == [1, 2]
    assert [e.ok for e in envs] == [True, False, False]
    assert envs[2].error is not None and envs[2].error.kind == "cancelled"
    assert res.first_error is envs[1]
    with pytest.raises(TaskError, match="step 2 failed"):
        res.unwrap()
    app.close()
