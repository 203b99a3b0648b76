"""Timeouts against blocking calls, and timeouts declared on the decorator, on threads and solo.

The README's promises: solo gets the soft timeout through SIGALRM, which interrupts a blocking
call; a pool thread sees it when its blocking call returns; the caller gets a hard_timeout
envelope at the limit, whatever the code is blocked in; ``soft_timeout`` / ``hard_timeout``
given to ``@throttled_task`` are enforced where Celery ignores them.
"""

from __future__ import annotations

import pytest
from celery import Celery

from .conftest import Workers, wait_until
from .probes import _events, finished, started
from .test_envelope import envelope

pytestmark = pytest.mark.timeout(240)


def returned(probe, prefix: str, group: str) -> list[str]:
    return [label for label, _ in _events(probe, prefix, group, "returned")]


def span(probe, prefix: str, group: str, label: str) -> float:
    return dict(finished(probe, prefix, group))[label] - dict(started(probe, prefix, group))[label]


def test_solo_soft_timeout_interrupts_a_blocking_call(
    workers: Workers, client: Celery, probe, prefix
):
    """Given a solo worker and a task blocked in one socket read of 30 s, when its soft time
    limit (0.5 s) passes, then the read is interrupted: the task ends with a soft_timeout
    envelope long before the read would have returned, and its code after the read never ran.
    Catches: a solo watchdog that raises only between Python steps (or not at all), which would
    leave the task blocked for the full 30 s."""
    workers.start(pool="solo", concurrency=1)
    res = client.send_task("t.blocker", ("read", 30.0, "recv"), soft_time_limit=0.5)
    env = envelope(client, res)
    assert env.error is not None and env.error.kind == "soft_timeout", env
    assert res.state == "FAILURE"
    assert span(probe, prefix, "blocking", "read") < 30.0 / 4
    assert returned(probe, prefix, "blocking") == []


def test_a_thread_blocked_in_a_c_call_sees_the_soft_timeout_when_it_returns(
    workers: Workers, client: Celery, probe, prefix
):
    """Given a threads worker and a task blocked in one 2 s time.sleep, when its soft time limit
    (0.3 s) passes during the sleep, then the sleep runs to its end (a thread cannot be
    interrupted inside a C call) and the task sees SoftTimeLimitExceeded as soon as it returns:
    a soft_timeout envelope, and the line after the sleep never ran. Catches: a watchdog that
    never raises in pool threads (the task would return "blocked")."""
    workers.start(pool="threads", concurrency=2)
    res = client.send_task("t.blocker", ("sleep", 2.0, "sleep"), soft_time_limit=0.3)
    env = envelope(client, res)
    assert env.error is not None and env.error.kind == "soft_timeout", env
    assert res.state == "FAILURE"
    assert span(probe, prefix, "blocking", "sleep") >= 2.0 - 0.05
    assert returned(probe, prefix, "blocking") == []


@pytest.mark.parametrize(("pool", "how"), [("threads", "sleep"), ("solo", "recv")])
def test_the_caller_gets_its_envelope_at_the_hard_limit_while_the_call_blocks(
    workers: Workers, client: Celery, probe, prefix, pool: str, how: str
):
    """Given a task blocked in one 3 s call (a sleep on threads, a socket read on solo) with a
    hard time limit of 0.5 s and no soft limit, then the caller gets a hard_timeout envelope
    while the call still blocks; once the call returns, the late outcome is discarded (the
    stored envelope stays hard_timeout) and only then is the slot free for the next task.
    Catches: a hard limit reported only when the code ends, a late outcome overwriting the
    envelope, and a slot released while the code still runs."""
    workers.start(pool=pool, concurrency=1 if pool == "solo" else 2)
    res = client.send_task("t.blocker", ("stuck", 3.0, how), time_limit=0.5)
    env = envelope(client, res, timeout=5 * 3.0)
    assert env.error is not None and env.error.kind == "hard_timeout", env
    assert res.state == "FAILURE"
    assert "stuck" not in dict(finished(probe, prefix, "blocking")), "reported only at the end"
    nxt = client.send_task("t.blocker", ("next", 0.0))
    assert envelope(client, nxt).ok
    ends = dict(finished(probe, prefix, "blocking"))
    assert dict(started(probe, prefix, "blocking"))["next"] >= ends["stuck"]
    assert returned(probe, prefix, "blocking")[0] == "stuck"  # the call did return, later
    late = envelope(client, res)
    assert late.error is not None and late.error.kind == "hard_timeout", late


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_timeouts_declared_on_the_decorator_are_enforced(
    workers: Workers, client: Celery, probe, prefix, pool: str
):
    """Given tasks declared with ``soft_timeout=0.5`` and ``hard_timeout=0.6`` on
    ``@throttled_task`` (nothing given per call), on a pool where Celery ignores time limits,
    then the first ends with a soft_timeout envelope instead of sleeping 5 s, and the caller of
    the second gets a hard_timeout envelope while its 3 s call still blocks. Catches: the
    watchdog armed only for per-call limits (the decorator's values mapped onto the task but
    never enforced)."""
    workers.start(pool=pool, concurrency=1 if pool == "solo" else 2)
    soft = envelope(client, client.send_task("t.timed_soft", ("soft", 5.0)))
    assert soft.error is not None and soft.error.kind == "soft_timeout", soft
    assert span(probe, prefix, "timed", "soft") < 5.0 / 2
    hard = envelope(client, client.send_task("t.timed_hard", ("hard", 3.0)))
    assert hard.error is not None and hard.error.kind == "hard_timeout", hard
    assert "hard" not in dict(finished(probe, prefix, "timed"))
    wait_until(
        lambda: "hard" in dict(finished(probe, prefix, "timed")),
        30,
        what="the blocked call to return",
    )
