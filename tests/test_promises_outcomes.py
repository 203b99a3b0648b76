"""Outcome promises on real workers: causes, Celery states, chords and errbacks, deadlines seen
from the caller and from inside the task, fallbacks that fail or must not apply, retries."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from types import ModuleType

import pytest
from celery import Celery, chord

from celery_throttled import ConfigurationError, current_context
from celery_throttled.status import inspect

from .conftest import Workers, wait_until
from .probes import _events, finished, started, wait_drained
from .test_cli import limiter_app
from .test_envelope import envelope

pytestmark = pytest.mark.timeout(240)


def test_the_cause_is_kept_at_most_five_deep(workers: Workers, client: Celery):
    """Given a task that raises a chain of 8 exceptions, then its envelope keeps the top error
    and 5 causes under it, in order, and no more. Catches: a cause chain cut short, or one that
    grows without bound (an envelope as large as the chain)."""
    workers.start(pool="threads", concurrency=2)
    env = envelope(client, client.send_task("t.deep_chain", (8,)))
    assert env.error is not None and env.error.message == "level 0"
    messages = []
    cause = env.error.cause
    while cause is not None:
        messages.append(cause.message)
        cause = cause.cause
    assert messages == [f"level {i}" for i in range(1, 6)]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_soft_timeouts_and_deadlines_are_celery_failures(
    workers: Workers, client: Celery, probe, prefix, pool: str
):
    """Given tasks that meet a soft timeout, a deadline while running, and a deadline while
    queued, then each envelope has its kind and Celery's state is FAILURE (``failed()`` is
    true), as the README's table says. Catches: an outcome stored as SUCCESS or with a state of
    its own, which Flower, chords and errbacks would misread."""
    workers.start(pool=pool, concurrency=2)
    soft = client.send_task("t.sleeper", ("soft", 5), soft_time_limit=0.4)
    running = client.send_task(
        "t.sleeper", ("running", 5), headers={"throttle_deadline": time.time() + 1.0}
    )
    for res, kind in ((soft, "soft_timeout"), (running, "deadline")):
        env = envelope(client, res)
        assert env.error is not None and env.error.kind == kind, env
        assert res.state == "FAILURE" and res.failed()
    queued = client.send_task("t.sleeper", ("queued", 0), headers={"throttle_deadline": 1.0})
    env = envelope(client, queued)
    assert env.error is not None and env.error.kind == "deadline", env
    assert queued.state == "FAILURE" and queued.failed()
    wait_drained(probe, prefix, "sleepy")


def test_a_chord_with_a_failing_throttled_member_and_link_error(
    workers: Workers, client: Celery, probe, prefix
):
    """Given a plain chord whose header holds throttled tasks, one of which fails, then the body
    never runs and the chord's result fails, naming the failed member; and a throttled task that
    fails calls its ``link_error`` errback once, with its id. Catches: throttled failures stored
    in a form Celery's chord and errback machinery does not see as failures."""
    workers.start(pool="prefork", concurrency=4)
    sig = client.signature
    header = [sig("t.limited", (f"c{i}", 0.05)) for i in range(3)] + [sig("t.panic", ("error",))]
    res = chord(header)(sig("t.summarize"))
    with pytest.raises(Exception, match=r"\[error\] builtins\.ValueError: boom"):
        res.get(timeout=60)
    wait_until(lambda: res.state == "FAILURE", 30, what="the chord to fail")
    failed_member = res.parent.results[3].id
    assert f"Dependency {failed_member} raised" in str(res.result)
    assert probe.llen(f"{prefix}:probe:eg:body") == 0
    failing = client.send_task("t.panic", ("error",), link_error=sig("t.record_errback"))
    assert not envelope(client, failing).ok
    key = f"{prefix}:probe:errbacks"
    wait_until(lambda: probe.llen(key) >= 1, 30, what="the errback")
    ok = client.send_task("t.panic", ("ok",), link_error=sig("t.record_errback"))
    assert envelope(client, ok).ok
    assert probe.lrange(key, 0, -1) == [failing.id]


def test_a_deadline_given_as_an_aware_datetime(workers: Workers, client: Celery, tasks: ModuleType):
    report_deadline, sleeper = client.tasks["t.report_deadline"], client.tasks["t.sleeper"]
    """Given deadlines passed as aware datetimes, then a task sees exactly that moment as its
    deadline, a task still running at it ends with a deadline envelope, and a naive datetime is
    refused naming the task. Catches: a datetime read as local time or as seconds from now, or
    silently accepted without a zone."""
    workers.start(pool="threads", concurrency=2)
    when = datetime.now(timezone.utc) + timedelta(seconds=60)
    env = report_deadline.apply_async(deadline=when).get(timeout=30)
    assert env.ok and env.value == pytest.approx(when.timestamp())
    soon = datetime.now(timezone(timedelta(hours=-5))) + timedelta(seconds=1.0)
    env = sleeper.apply_async(("dt", 5), deadline=soon).get(timeout=30)
    assert env.error is not None and env.error.kind == "deadline", env
    assert env.runtime is not None and env.runtime < 5 / 2
    with pytest.raises(ConfigurationError, match=r"t\.sleeper.*naive datetime"):
        sleeper.apply_async(("naive", 0), deadline=datetime.now())


def test_a_deadline_passing_while_running_on_solo(workers: Workers, client: Celery, probe, prefix):
    """Given a solo worker, when a task's deadline passes while it sleeps in steps, and while
    another is blocked in one 30 s socket read, then both end with a deadline envelope soon after
    the deadline, not when their work would have ended. Catches: a deadline that becomes the
    soft limit on threads and prefork but not on solo."""
    workers.start(pool="solo", concurrency=1)
    steps = client.send_task(
        "t.sleeper", ("steps", 5), headers={"throttle_deadline": time.time() + 1.0}
    )
    env = envelope(client, steps)
    assert env.error is not None and env.error.kind == "deadline", env
    assert env.runtime is not None and env.runtime < 5 / 2
    read = client.send_task(
        "t.blocker", ("read", 30.0, "recv"), headers={"throttle_deadline": time.time() + 1.0}
    )
    env = envelope(client, read)
    assert env.error is not None and env.error.kind == "deadline", env
    ends, starts = (
        dict(finished(probe, prefix, "blocking")),
        dict(started(probe, prefix, "blocking")),
    )
    assert ends["read"] - starts["read"] < 30 / 4


def test_remaining_and_check_inside_a_task_and_the_background_context(
    workers: Workers, client: Celery, probe, prefix
):
    """Given a task with a deadline 4 s away (room for a loaded machine to start it in time),
    then inside it ``remaining()`` counts down from at most 4 s, is 0.0 once the deadline has
    passed, and ``check()`` then raises
    ``DeadlineExceeded`` (a deadline envelope of that type); outside any task
    ``current_context()`` is the background context: no deadline, never cancelled, ``check()``
    silent. Catches: a check() that ignores the deadline, a remaining() that goes negative or
    never shrinks, and a background context that raises."""
    workers.start(pool="threads", concurrency=2)
    sent = time.time()
    deadline = sent + 4.0
    res = client.send_task("t.deadline_probe", ("d",), headers={"throttle_deadline": deadline})
    env = envelope(client, res)
    assert env.error is not None and env.error.kind == "deadline", env
    assert env.error.type == "celery_throttled.errors.DeadlineExceeded"
    before, after = (json.loads(x) for x in probe.lrange(f"{prefix}:probe:context:d", 0, -1))
    assert before["deadline"] == pytest.approx(deadline)
    assert 0 < before["remaining"] <= 4.0
    assert after == {"remaining": 0.0, "cancelled": False}
    background = current_context()
    assert (background.deadline, background.remaining(), background.cancelled) == (
        None,
        None,
        False,
    )
    background.check()
    no_deadline = envelope(client, client.send_task("t.report_deadline"))
    assert no_deadline.ok and no_deadline.value is None


def test_a_failing_fallback_keeps_the_original_error_as_its_cause(workers: Workers, client: Celery):
    """Given a task whose fallback raises too, then its envelope is failed (not degraded): the
    fallback's error, saying the fallback failed, with the task's own error as its cause.
    Catches: the original error lost, or a failed fallback reported as a degraded success."""
    workers.start(pool="threads", concurrency=2)
    res = client.send_task("t.fallback_fails", ("sku-9",))
    env = envelope(client, res)
    assert not env.ok and not env.degraded
    assert env.error is not None and env.error.type == "builtins.LookupError"
    assert env.error.message == "the fallback failed too: no cached price for sku-9"
    assert env.error.cause is not None and env.error.cause.type == "builtins.ValueError"
    assert env.error.cause.message == "pricing service down for sku-9"
    assert res.state == "FAILURE"


def test_hard_timeouts_and_lost_workers_are_not_degraded(
    workers: Workers, client: Celery, probe, prefix
):
    """Given tasks with a fallback, when one passes its hard limit on prefork (killed), one kills
    its own pool process, and one passes its hard limit on threads and then fails late, then
    each caller gets a failed hard_timeout or worker_lost envelope, never the fallback's value,
    and the late failure on threads does not replace it. Catches: failures seen from outside the
    task handed to the fallback."""
    workers.start(pool="prefork", concurrency=2, name="p")
    killed = client.send_task("t.fallback_blocker", ("killed", 30.0), time_limit=0.5)
    env = envelope(client, killed)
    assert env.error is not None and env.error.kind == "hard_timeout" and not env.degraded, env
    lost = envelope(client, client.send_task("t.fallback_suicide", ("lost",)))
    assert lost.error is not None and lost.error.kind == "worker_lost" and not lost.degraded, lost
    workers.started[0].stop()
    workers.start(pool="threads", concurrency=2, name="t")
    late = client.send_task("t.fallback_blocker", ("late", 2.0), time_limit=0.5)
    env = envelope(client, late)
    assert env.error is not None and env.error.kind == "hard_timeout" and not env.degraded, env
    nxt = client.send_task("t.fallback_blocker", ("next", 0.0))  # runs once "late" has ended
    assert envelope(client, nxt).degraded
    assert "late" in [label for label, _ in _events(probe, prefix, "fallback", "returned")]
    env = envelope(client, late)
    assert env.error is not None and env.error.kind == "hard_timeout" and not env.degraded, env
    assert late.state == "FAILURE"


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_retries_are_counted_as_retried(
    workers: Workers, client: Celery, probe, prefix, redis_url, pool: str
):
    """Given a task that fails twice with a retried error and then succeeds, then its key counts
    2 runs ended "retried" and 1 "done" (none "failed"), and ``celery throttle status`` shows
    them (on prefork the metrics test checks the same). Catches: retries counted as failures,
    or not counted."""
    workers.start(pool=pool, concurrency=1 if pool == "solo" else 2)
    env = envelope(client, client.send_task("t.retrying", ("r",)))
    assert env.ok and env.attempts == 3
    app = limiter_app(redis_url, prefix)
    status = wait_until(
        lambda: (s := inspect(app, ["policy"])[0]).done == 1 and s,
        10,
        what="the last release to be counted",
    )
    assert (status.retried, status.done, status.failed) == (2, 1, 0)
    assert status.to_json()["retried"] == 2
