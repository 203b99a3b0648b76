"""Cluster-wide rates, measured inside the tasks, with real Redis and real worker processes."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
import redis
from celery import Celery

from celery_throttled.keys import Family

from .conftest import RedisServer, Workers, free_port, wait_until
from .probes import peak, started, wait_drained

pytestmark = pytest.mark.timeout(240)


def most_in_any_window(stamps: list[float], window: float) -> int:
    """The largest number of ``stamps`` inside any closed interval of ``window`` seconds."""
    stamps = sorted(stamps)
    best, first = 0, 0
    for last, stamp in enumerate(stamps):
        while stamp - stamps[first] > window:
            first += 1
        best = max(best, last - first + 1)
    return best


def run_all(
    client: Celery, name: str, args_list: list[tuple[Any, ...]], timeout: float = 90
) -> list[Any]:
    results = [client.send_task(name, args) for args in args_list]
    return [r.get(timeout=timeout) for r in results]


def test_a_rate_holds_across_two_workers(workers: Workers, client, probe, prefix):
    """Given two workers (prefork and threads) and a task declared rate="5/s" (no limit),
    When 16 are submitted at once,
    Then every one ran and no 1-second window saw more than 6 starts (burst 1 + 5/s): a rate
    kept per worker (two workers, about twice the rate) fails here."""
    workers.start(pool="prefork", concurrency=4)
    workers.start(pool="threads", concurrency=4)
    labels = run_all(client, "f.rated", [(f"r{i}",) for i in range(16)])
    assert labels == [f"r{i}" for i in range(16)]
    stamps = [stamp for _, stamp in started(probe, prefix, "rated")]
    assert most_in_any_window(stamps, 1.0) <= 6, sorted(stamps)
    assert most_in_any_window(stamps, 3.0) <= 16  # the whole run took more than 3 s
    wait_drained(probe, prefix, "f.rated")


def test_rate_and_limit_together_never_deadlock(workers: Workers, client, probe, prefix):
    """Given limit=1 and rate="4/s" on one key, over two workers,
    When short tasks (the rate binds) and long ones (the cap binds) are mixed,
    Then all of them run, never two at once, and never more than 5 starts in a second: a task
    holding its slot while it waits for a token (a deadlock, or the cap exceeded) fails here."""
    workers.start(pool="prefork", concurrency=3)
    workers.start(pool="prefork", concurrency=3)
    args = [(f"c{i}", 0.4 if i % 3 == 0 else 0.0) for i in range(12)]
    assert run_all(client, "f.rated_capped", args) == [label for label, _ in args]
    assert peak(probe, prefix, "rated_capped") == 1
    stamps = [stamp for _, stamp in started(probe, prefix, "rated_capped")]
    assert len(stamps) == 12
    assert most_in_any_window(stamps, 1.0) <= 5, sorted(stamps)
    wait_drained(probe, prefix, "f.rated_capped")


def test_the_next_token_wakes_its_waiter_without_polling(
    workers: Workers, client, probe, prefix, private_redis: RedisServer
):
    """Given a task at rate="60/m" whose limiter has a Redis of its own, and leases renewed
    only every 20 s,
    When four are submitted at once,
    Then they start a token apart (woken when each token is due, not at the next renewal), and
    the limiter ran only a few scripts per task: a waiter left until the next renewal, or a
    worker polling Redis while it waits, fails here."""
    limiter = redis.Redis(port=private_redis.port)
    workers.start(pool="prefork", concurrency=4, LIMITER_URL=private_redis.url, LEASE_TTL=60)

    def scripts() -> int:
        stats = limiter.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))

    before = scripts()
    assert run_all(client, "f.slow_rate", [(f"s{i}",) for i in range(4)]) == [
        f"s{i}" for i in range(4)
    ]
    stamps = sorted(stamp for _, stamp in started(probe, prefix, "slow_rate"))
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(gap < 10 for gap in gaps), gaps  # woken when due: renewals come every 20 s
    # the schedule never runs ahead (a start that came late lets the next follow sooner)
    assert stamps[-1] - stamps[0] >= 3 - 0.3, gaps
    wait_until(
        lambda: int(limiter.zcard(f"{prefix}:{{f.slow_rate}}:h")) == 0, 10, what="the last release"
    )
    # 4 acquires, 4 releases, about one wake-up per token: polling every 50 ms would be ~60
    assert scripts() - before <= 16


def test_a_key_function_gives_one_rate_per_key(workers: Workers, client, probe, prefix):
    """Given rate="2/s" per tenant key, When two tenants submit four each at once,
    Then each tenant stays within its own rate while the two run side by side: a rate shared
    across keys (half the throughput) or none at all fails here."""
    workers.start(pool="threads", concurrency=8)
    args = [(tenant, f"{tenant}{i}") for i in range(4) for tenant in "AB"]
    assert run_all(client, "f.rate_per_key", args) == [label for _, label in args]
    firsts = []
    for tenant in "AB":
        stamps = [stamp for _, stamp in started(probe, prefix, f"rate:{tenant}")]
        assert len(stamps) == 4 and most_in_any_window(stamps, 1.0) <= 3, sorted(stamps)
        firsts.append(sorted(stamps))
    # side by side: both tenants' second starts came before either tenant's third
    assert max(s[1] for s in firsts) < min(s[2] for s in firsts)


def test_operators_see_and_change_a_rate(workers: Workers, client, probe, prefix, redis_url):
    """Given a backlog behind rate="60/m" and a worker serving metrics,
    When an operator looks, raises the rate to 20/s, then resets it,
    Then status shows the declared rate, the override (starred) and the starts it let through,
    the backlog speeds up at once, reset brings the declared rate back, and the metrics carry
    the rate: a CLI that cannot see or change rates, or an override the scripts ignore, fails
    here."""
    from celery_throttled.status import inspect

    from .test_cli import limiter_app, run
    from .test_metrics import scrape

    app = limiter_app(redis_url, prefix)
    port = free_port()
    workers.start(pool="threads", concurrency=8, METRICS_PORT=port)
    results = [client.send_task("f.slow_rate", (f"s{i}",)) for i in range(30)]
    wait_until(lambda: len(started(probe, prefix, "slow_rate")) >= 2, 30, what="two starts")
    (doc,) = json.loads(run(app, "status", "--json", "f.slow_rate").output)
    assert (doc["rate"], doc["rate_source"], doc["cap"]) == ("1/s", "decorator", None)
    assert "1/s (" in run(app, "status").output
    top = run(app, "top", "--once").output
    assert "rate" in top and "1/s (" in top, top
    out = run(app, "set", "f.slow_rate", "--rate", "20/s")
    assert out.exit_code == 0 and "rate 20/s*" in out.output, out.output
    for r in results:
        r.get(timeout=30)  # 28 more at 1/s would take 28 s
    assert (
        wait_until(
            lambda: inspect(app, ["f.slow_rate"])[0].rate_used,
            3,
            what="the starts of the last second",
        )
        >= 5
    )
    out = run(app, "reset", "f.slow_rate")
    assert out.exit_code == 0 and "rate 1/s (" in out.output, out.output
    bad = run(app, "set", "f.slow_rate", "--rate", "fast")
    assert bad.exit_code == 1 and "got 'fast'" in bad.output
    assert run(app, "set", "f.slow_rate").exit_code == 2
    metrics = scrape(port)
    assert metrics[("celery_throttle_rate", (("key", "f.slow_rate"),))] == 1.0
    assert metrics[("celery_throttle_cap", (("key", "f.slow_rate"),))] == float("inf")
    assert metrics[("celery_throttle_started_total", (("key", "f.slow_rate"),))] == 30


def test_a_celery_rate_limit_backlog_slows_neither_its_own_rate_nor_the_gates(
    workers: Workers, client, probe, prefix
):
    """Given one prefork worker with the gate installed and 80 tasks of rate="20/s" held in it,
    waiting for their tokens,
    When 100 plain tasks with Celery's own rate_limit="50/s" arrive on the same worker,
    Then the held tasks keep their schedule (first to last start within 2.5 times the ideal
    3.95 s) and the plain ones start at least 10 a second (their rate is 50): kombu's event loop
    sleeping a second with timer entries overdue (Celery's rate-limit retries pile up past the
    10 it fires a turn), which starts Celery's tasks at about one a second and delays the gate's
    token wake-ups as long, fails here."""
    workers.start(pool="prefork", concurrency=8)
    held = [client.send_task("f.rated_fast", (f"r{i}",)) for i in range(80)]
    waiters = Family.of(prefix, "f.rated_fast").waiters
    wait_until(
        lambda: probe.zcard(waiters) + len(started(probe, prefix, "rated_fast")) == 80,
        30,
        what="every rated task to be held or started",
    )
    plain = [client.send_task("f.celery_rate", (f"c{i}",)) for i in range(100)]
    for result in held + plain:
        result.get(timeout=120)
    rated = sorted(stamp for _, stamp in started(probe, prefix, "rated_fast"))
    assert rated[-1] - rated[0] <= 2.5 * 79 / 20, rated
    celery = sorted(stamp for _, stamp in started(probe, prefix, "celery_rate"))
    assert len(celery) / (celery[-1] - celery[0]) >= 10, celery
    wait_drained(probe, prefix, "f.rated_fast")
