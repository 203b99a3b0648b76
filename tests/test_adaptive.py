"""Adaptive caps against real workers and a fragile downstream kept in Redis
(tests/apps/adaptive_app.py): convergence, the Retry-After pause, the pin, the bounds, one cap
shared by two workers, and bad declarations."""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

import pytest
import redis
import redis.cluster
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner
from rich.console import Console

from celery_throttled import (
    Adaptive,
    ConfigurationError,
    KeyStatus,
    Overloaded,
    SlowDown,
    UnknownKey,
    errgroup,
    inspect,
    throttled_task,
)
from celery_throttled.adaptive import signal
from celery_throttled.admission import Admission
from celery_throttled.cli import frame, render, throttle
from celery_throttled.keys import Family
from celery_throttled.transport.leases import Acquire, RedisLeases, Release

from .conftest import Workers, free_port
from .probes import finished, peak, started, wait_drained
from .test_metrics import key as metric
from .test_metrics import scrape
from .test_topology import cluster  # noqa: F401  (the three-primary Redis Cluster fixture)
from .topologies import ClusterSetup

pytestmark = pytest.mark.timeout(240)


def limiter_app(redis_url: str, prefix: str) -> Celery:
    app = Celery("adaptive", broker=redis_url, set_as_current=False)
    app.conf.throttle_key_prefix = prefix
    return app


def run_cli(app: Celery, *args: str) -> Any:
    return CliRunner().invoke(throttle, list(args), obj=CLIContext(app, True, None))


def status_of(app: Celery, key: str) -> KeyStatus | None:
    try:
        return inspect(app, [key])[0]
    except UnknownKey:
        return None


def run_all(client: Celery, name: str, args_list: list[tuple[Any, ...]], timeout: float = 120):
    results = [client.send_task(name, args) for args in args_list]
    return [r.get(timeout=timeout) for r in results]


def test_two_workers_converge_on_one_cap_near_the_downstreams_capacity(
    workers: Workers, client, probe: redis.Redis, prefix, redis_url
):
    """Given a downstream that serves 3 calls at once (refusing the rest with Overloaded, which
    a RetryPolicy retries) and a task with Adaptive(initial=8, min=1, max=12) on two workers of
    6 processes each,
    When 90 calls of 50 ms are submitted at once,
    Then every call succeeds, the downstream refused few of them, the cap ends within one of 3,
    and at no moment did more than 5 bodies run: a cap that does not move (8 at once: most
    calls refused), a cap kept per worker (two caps: twice the concurrency), or one that never
    settles fails here."""
    probe.set(f"{prefix}:down:fragile:cap", 3)
    workers.start(pool="prefork", concurrency=6)
    workers.start(pool="prefork", concurrency=6)
    labels = [f"c{i}" for i in range(90)]
    assert run_all(client, "a.fragile", [(label,) for label in labels]) == labels
    refused = int(probe.get(f"{prefix}:down:fragile:503") or 0)
    assert refused <= 15, refused
    assert peak(probe, prefix, "fragile") <= 5
    status = status_of(limiter_app(redis_url, prefix), "a.fragile")
    assert status is not None and status.cap_source == "adaptive"
    assert status.adaptive_min == 1 and status.adaptive_max == 12
    assert status.cap is not None and 2 <= status.cap <= 4, status
    assert status.adaptive_why, status
    wait_drained(probe, prefix, "a.fragile")


def test_an_adaptive_cap_holds_on_a_redis_cluster(
    workers: Workers,
    client,
    probe: redis.Redis,
    prefix,
    cluster: ClusterSetup,  # noqa: F811
):
    """Given a limiter on a three-primary Redis Cluster, a downstream that serves 3 calls at
    once and a task with Adaptive(initial=8, min=1, max=12) on two workers,
    When 60 calls are submitted at once,
    Then every call succeeds, no more than 5 bodies ever ran at once and the cap came down
    from 8, its state, bodies and holders in one slot: a run's report or body count refused by
    the cluster (keys of one key spread over slots), which would leave the cap at 8 and most
    calls refused, fails here."""
    probe.set(f"{prefix}:down:fragile:cap", 3)
    for name in ("a", "b"):
        workers.start(pool="prefork", concurrency=6, name=name, LIMITER_URL=cluster.url)
    labels = [f"c{i}" for i in range(60)]
    assert run_all(client, "a.fragile", [(label,) for label in labels]) == labels
    assert peak(probe, prefix, "fragile") <= 5
    assert int(probe.get(f"{prefix}:down:fragile:503") or 0) <= 15
    nodes = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    family = Family.of(prefix, "a.fragile")
    cap = float(nodes.hget(family.meta, "acap") or 0)
    assert 1 <= cap < 6, cap
    keys = [family.meta, family.holders, family.bodies]
    assert len({nodes.keyslot(k) for k in keys}) == 1


def test_a_retry_after_pauses_the_key_and_its_end_wakes_the_waiters(
    workers: Workers, client, probe: redis.Redis, prefix
):
    """Given an adaptive task whose first run raises SlowDown(retry_after=1.5), and leases
    renewed only every 20 s,
    When four more runs are submitted right after it failed,
    Then none starts before the pause ends, and all start within a second of its end: a
    Retry-After that does not pause admissions, or a pause whose end nobody is woken for (the
    waiters left until the next renewal), fails here."""
    workers.start(pool="prefork", concurrency=4, LEASE_TTL=60)
    first = client.send_task("a.polite", ("first", 1.5))
    with pytest.raises(Exception, match="SlowDown"):
        first.get(timeout=30)
    ((_, failed_at),) = finished(probe, prefix, "polite") or [("", 0.0)]
    results = [client.send_task("a.polite", (f"p{i}",)) for i in range(4)]
    assert [r.get(timeout=30) for r in results] == [f"p{i}" for i in range(4)]
    starts = [stamp for label, stamp in started(probe, prefix, "polite") if label != "first"]
    assert len(starts) == 4
    assert min(starts) >= failed_at + 1.5 - 0.1, (failed_at, starts)
    assert max(starts) <= failed_at + 2.5, (failed_at, starts)
    wait_drained(probe, prefix, "a.polite")


def test_a_pin_wins_until_reset(workers: Workers, client, probe: redis.Redis, prefix, redis_url):
    """Given an adaptive task (initial 8) whose cap has grown past 1, pinned to 1 by
    `celery throttle set`,
    When ten runs of 200 ms are submitted,
    Then they run one at a time and the status says the cap is pinned; after reset the
    adaptive cap is back in charge: a pin that the adaptive cap overrides (or that reset does
    not lift) fails here."""
    app = limiter_app(redis_url, prefix)
    workers.start(pool="prefork", concurrency=6)
    warm = [f"w{i}" for i in range(12)]
    assert run_all(client, "a.pinned", [(label, 0.05) for label in warm]) == warm
    said = run_cli(app, "set", "a.pinned", "1").output
    assert said.startswith("a.pinned: cap 1 (override; adaptive "), said
    pinned = status_of(app, "a.pinned")
    assert pinned is not None and pinned.cap == 1 and pinned.cap_source == "override"
    assert pinned.adaptive_cap is not None and pinned.adaptive_cap >= 3, pinned
    probe.delete(f"{prefix}:probe:pinned:peak")
    labels = [f"p{i}" for i in range(10)]
    assert run_all(client, "a.pinned", [(label, 0.2) for label in labels]) == labels
    assert peak(probe, prefix, "pinned") == 1
    said = run_cli(app, "reset", "a.pinned").output
    assert said.startswith("a.pinned: cap ") and "(adaptive 1..16)" in said, said
    status = status_of(app, "a.pinned")
    assert status is not None and status.cap_source == "adaptive" and status.override is None
    assert status.cap is not None and status.cap >= 3, status
    wait_drained(probe, prefix, "a.pinned")


def test_the_bounds_are_never_crossed_one_cap_per_key(
    workers: Workers, client, probe: redis.Redis, prefix, redis_url
):
    """Given Adaptive(initial=3, min=2, max=4) with a key function, on a worker of 8,
    When one key's runs always succeed and another's always raise Overloaded,
    Then the first key's cap rose to 4 and never let more than 4 run, the second's fell to 2
    and no lower, each key with a cap of its own, and status, top and the metrics say so (the
    cap, the bounds, why it last moved): growth past max, a cut below min, one cap for both
    keys, or a cap the operator cannot see fails here."""
    app = limiter_app(redis_url, prefix)
    port = free_port()
    workers.start(pool="prefork", concurrency=8, METRICS_PORT=port)
    ok = [client.send_task("a.bounded", ("fine", f"f{i}")) for i in range(40)]
    bad = [client.send_task("a.bounded", ("refused", f"r{i}")) for i in range(30)]
    assert [r.get(timeout=60) for r in ok] == [f"f{i}" for i in range(40)]
    for r in bad:
        with pytest.raises(Exception, match="Overloaded"):
            r.get(timeout=60)
    fine = status_of(app, "bounds:fine")
    refused = status_of(app, "bounds:refused")
    assert fine is not None and refused is not None
    assert fine.cap == 4 and fine.adaptive_cap == 4, fine
    assert refused.cap == 2 and refused.adaptive_cap == 2, refused
    assert peak(probe, prefix, "bounded:fine") <= 4
    assert peak(probe, prefix, "bounded:refused") <= 3  # 3 at most before the first cut
    assert "overloaded" in (refused.adaptive_why or ""), refused
    assert "bounds:refused: adaptive 2..4 at 2, moved" in render([fine, refused])
    console = Console(width=200, record=True)
    console.print(frame([fine, refused]))
    assert "4 ~2..4" in console.export_text()
    metrics = scrape(port)
    for name, value in (("cap", 4), ("cap_min", 2), ("cap_max", 4)):
        assert metrics[metric(f"celery_throttle_{name}", key="bounds:fine")] == value, name
    assert metrics[metric("celery_throttle_cap", key="bounds:refused")] == 2
    assert metric("celery_throttle_cap_moved", key="bounds:refused", reason="overloaded") in (
        metrics
    )


def test_a_rising_latency_holds_the_cap_below_the_knee(
    workers: Workers, client, probe: redis.Redis, prefix, redis_url
):
    """Given a downstream that never refuses but slows down past 3 callers (6 inside: twice as
    slow), and Adaptive(initial=4, min=1, max=16) on a worker of 16,
    When 200 calls are submitted at once,
    Then the cap stayed below 8 and never let more than 8 run, and its last move names the
    latency: a cap that grows on success alone (to 16, every call queueing) fails here."""
    workers.start(pool="threads", concurrency=16)
    labels = [f"q{i}" for i in range(200)]
    assert run_all(client, "a.queueing", [(label,) for label in labels]) == labels
    status = status_of(limiter_app(redis_url, prefix), "a.queueing")
    assert status is not None and status.cap is not None and status.cap <= 7, status
    assert peak(probe, prefix, "queueing") <= 8
    assert (status.adaptive_why or "").startswith(("held: latency", "latency")), status


def test_an_overloaded_member_fails_its_errgroup_as_an_error_and_cuts_the_cap(
    workers: Workers, client, tasks, prefix, redis_url
):
    """Given an errgroup whose members run under adaptive caps (one key per mode), one of them
    raising Overloaded,
    When it runs,
    Then the group fails with that member's envelope of kind error naming Overloaded, and that
    key's cap was cut from 3 to 2: an Overloaded given a kind of its own, or a member's outcome
    not reaching its cap, fails here."""
    workers.start(pool="prefork", concurrency=4)
    members = [client.signature("a.bounded", args=("fine", f"e{i}")) for i in range(3)]
    members.insert(1, client.signature("a.bounded", args=("refused", "bad")))
    res = errgroup(members).apply_async()
    res.get(timeout=60)
    assert res.first_error is not None and res.first_error.task_id == res.member_ids[1]
    error = res.first_error.error
    assert error is not None and error.kind == "error" and "Overloaded" in error.type, error
    refused = status_of(limiter_app(redis_url, prefix), "bounds:refused")
    assert refused is not None and refused.cap == 2, refused
    assert "overloaded" in (refused.adaptive_why or ""), refused


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        (Adaptive(initial=4, min=5, max=3), "min"),
        (Adaptive(initial=20, min=1, max=10), "initial"),
        (Adaptive(initial=0, min=1, max=10), "initial"),
        (Adaptive(initial=4, min=1, max=10, on=(ValueError, "503")), "on"),
        (Adaptive(initial=4, min=1, max=10, on=int), "on"),
    ],
)
def test_bad_declarations_are_refused_at_decoration(limit: Adaptive, message: str):
    """Given an Adaptive with min > max, initial outside the bounds, or a non-exception in on=,
    When a task is decorated with it,
    Then ConfigurationError names the task, the setting and the value: a bad declaration that
    reaches the workers (and a cap that cannot exist) fails here."""
    with pytest.raises(ConfigurationError, match=rf"'adaptive\.bad'.*{message}"):
        throttled_task(limit=limit, name="adaptive.bad")(lambda: None)


def test_tasks_sharing_a_key_must_agree_on_its_adaptive_cap():
    """Given a task declaring Adaptive(initial=4, min=1, max=8) on a shared key,
    When another task declares a fixed limit=4 (its initial) on that key,
    Then ConfigurationError names both: two declarations that would flip the key's cap between
    adaptive and fixed at every acquire fail here."""

    @throttled_task(limit=Adaptive(initial=4, max=8), key="adaptive-shared", name="adaptive.one")
    def one() -> None: ...

    with pytest.raises(ConfigurationError, match=r"'adaptive\.two'.*1\.\.8.*'adaptive\.one'"):

        @throttled_task(limit=4, key="adaptive-shared", name="adaptive.two")
        def two() -> None: ...


ADAPT = resources.files("celery_throttled").joinpath("lua/adapt.lua").read_text()


@pytest.fixture
def adaptive_key(redis_url: str, prefix: str) -> tuple[redis.Redis, Family, Any]:
    """An adaptive key (2..10, past its slow start) declared by a real acquire, with a client
    and ``report(outcome, latency_ms)`` running lua/adapt.lua on it."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = RedisLeases(redis.Redis.from_url(redis_url), prefix, lease_ttl=30, worker="w")
    admission = Admission(adaptive=Adaptive(initial=8, min=2, max=10).checked("t"))
    family = Family.of(prefix, "k")
    store.execute([Acquire("k", "w a0", 8, admission)])
    client.hset(family.meta, "acap", 10)
    client.hdel(family.meta, "athresh")
    store.execute([Acquire("k", f"w a{i}", 8, admission) for i in range(1, 10)])
    assert client.zcard(family.holders) == 10
    script = client.register_script(ADAPT)

    def report(outcome: str, latency_ms: int) -> None:
        script([family.holders, family.waiters, family.meta], [outcome, latency_ms, 0])

    return client, family, report


def test_an_adaptive_cap_is_one_cap_for_every_worker(redis_url: str, prefix: str):
    """Given an adaptive key whose cap stands at 3.6 (a float: admissions use its floor),
    When two workers ask for six slots between them, alternating,
    Then three are granted in all, whoever asks, and the others wait: a cap read per worker, or
    as anything but the floor of the one value in Redis, fails here."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    admission = Admission(adaptive=Adaptive(initial=8, min=1, max=12).checked("t"))
    stores = [
        RedisLeases(redis.Redis.from_url(redis_url), prefix, lease_ttl=30, worker=w)
        for w in ("wa", "wb")
    ]
    family = Family.of(prefix, "one")
    stores[0].execute([Acquire("one", "wa first", 8, admission)])
    stores[0].execute([Release("one", "wa first", 8, "done", admission=admission)])
    client.hset(family.meta, "acap", 3.6)
    client.hdel(family.meta, "athresh")
    granted = []
    for i in range(6):
        store = stores[i % 2]
        (outcome,) = store.execute([Acquire("one", f"{store.codec.worker} t{i}", 8, admission)])
        granted += outcome.granted
    assert granted == ["wa t0", "wb t1", "wa t2"]
    assert client.zcard(family.holders) == 3 and client.zcard(family.waiters) == 3


def test_tasks_failing_together_cut_the_cap_once(adaptive_key):
    """Given an adaptive key (2..10) at cap 10 with 10 running,
    When eight runs that started before any cut report Overloaded,
    Then the cap is cut once (to 7), a run started after that cut cuts again (to 4.9), and no
    number of cuts takes it below its min: a cap cut by every failure of one batch (collapsing
    to min at the first burst of 503s) fails here."""
    client, family, report = adaptive_key
    for _ in range(8):
        report("overloaded", 500)
    assert float(client.hget(family.meta, "acap")) == pytest.approx(7.0)
    assert client.hget(family.meta, "awhy") == "overloaded at 10 running"
    time.sleep(0.01)
    report("overloaded", 0)
    assert float(client.hget(family.meta, "acap")) == pytest.approx(4.9)
    for _ in range(6):
        time.sleep(0.005)
        report("overloaded", 0)
    assert float(client.hget(family.meta, "acap")) == 2


def test_successes_grow_the_cap_only_while_it_is_used(adaptive_key):
    """Given an adaptive key at cap 10 (its max) cut once to 7, with 10 holders,
    When runs succeed at a steady latency, first with the cap in use, then with nothing running,
    Then the cap grows by about 1/cap per success while used (16 times slower within one of the
    level that failed), and not at all while idle: growth without evidence (an idle key
    drifting to max), or a probe as fast as the growth below it, fails here."""
    client, family, report = adaptive_key
    report("overloaded", 500)  # 7.0, the ceiling 10
    for _ in range(7):
        report("ok", 50)
    grown = float(client.hget(family.meta, "acap"))
    assert 7.9 < grown < 8.1, grown  # seven steps of about 1/7
    client.hset(family.meta, "acap", 9)  # within one of the ceiling: a probe, 16 times slower
    for _ in range(9):
        report("ok", 50)
    assert float(client.hget(family.meta, "acap")) == pytest.approx(9 + 9 / (16 * 9), abs=0.01)
    # the integer cap (what admits) never changed by growing, so the last move is still the cut
    assert client.hget(family.meta, "awhy") == "overloaded at 10 running"
    grown = float(client.hget(family.meta, "acap"))
    client.delete(family.holders)
    for _ in range(20):
        report("ok", 50)
    assert float(client.hget(family.meta, "acap")) == grown


def test_slow_start_grows_half_a_slot_per_success_and_cuts_back_to_the_level_before(
    redis_url: str, prefix: str
):
    """Given a fresh adaptive key (initial 8, so slow start from 1) whose cap is always in use,
    When every run of each level succeeds, then a run at the level reached reports Overloaded,
    Then the cap grows 1.5x a round trip (three successes at 3 take it to 4, not 6), and the
    overload cuts it back to the level before (4 / 1.5), the ceiling just above: a slow start
    that doubles (a downstream serving 3 offered 6 calls at once, when three runs succeed
    before the first refusal can cut) fails here."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = RedisLeases(redis.Redis.from_url(redis_url), prefix, lease_ttl=30, worker="w")
    admission = Admission(adaptive=Adaptive(initial=8, min=1, max=12).checked("t"))
    family = Family.of(prefix, "fresh")
    store.execute([Acquire("fresh", f"w a{i}", 8, admission) for i in range(12)])
    assert client.hget(family.meta, "acap") == "1"
    assert client.hget(family.meta, "athresh") == "8"
    script = client.register_script(ADAPT)

    def cap() -> float:
        return float(client.hget(family.meta, "acap") or "nan")

    def round_trip(level: int) -> float:
        """``level`` runs hold the key and all succeed; the cap after them."""
        client.delete(family.holders)
        client.zadd(family.holders, {f"w r{i}": 0 for i in range(level)})
        for _ in range(level):
            script([family.holders, family.waiters, family.meta], ["ok", 50, 0])
        return cap()

    assert [round_trip(level) for level in (1, 1, 2, 3)] == [1.5, 2.0, 3.0, 4.5]
    assert client.hget(family.meta, "awhy") == "slow start toward 8"
    client.zadd(family.holders, {"w r3": 0})  # the four the cap of 4.5 admits
    script([family.holders, family.waiters, family.meta], ["overloaded", 0, 0])
    assert cap() == pytest.approx(4 / 1.5)
    assert client.hget(family.meta, "aceil") == "3"
    assert client.hget(family.meta, "athresh") is None


def test_only_a_run_that_started_beside_a_whole_cap_of_bodies_grows_the_cap(adaptive_key):
    """Given an adaptive key at cap 5 with 5 holders but, as under load, only 3 of their bodies
    running (counted by lua/body.lua as each starts),
    When runs that started beside 3 bodies succeed, then runs that started beside 5,
    Then the first grow nothing and the second grow the cap, and every run leaves the count of
    bodies as it reports: a cap grown on holders admitted but not yet running (it climbs past a
    downstream's capacity while no call too many reaches it, until they all start together:
    a downstream serving 3 saw 6 calls at once), or bodies that never leave the count, fail
    here."""
    client, family, _ = adaptive_key
    client.hset(family.meta, "acap", 5)
    client.delete(family.holders)
    client.zadd(family.holders, {f"w a{i}": 0 for i in range(5)})
    body = client.register_script(
        resources.files("celery_throttled").joinpath("lua/body.lua").read_text()
    )
    adapt = client.register_script(ADAPT)
    keys = [family.holders, family.waiters, family.meta, family.bodies]
    assert [body([family.bodies], [f"w a{i}", 30_000]) for i in range(3)] == [1, 2, 3]
    for i in range(3):
        adapt(keys, ["ok", 50, 0, 3, f"w a{i}"])
    assert float(client.hget(family.meta, "acap") or 0) == 5.0
    assert client.zcard(family.bodies) == 0
    for i in range(5):
        adapt(keys, ["ok", 50, 0, 5, f"w a{i}"])
    assert float(client.hget(family.meta, "acap") or 0) > 5.9


def test_what_a_run_tells_the_cap():
    """Given the exceptions a task may end with,
    When they are classified for the cap,
    Then Overloaded and the types listed in on= cut, SlowDown (or a listed type with a
    retry_after) pauses too, and any other failure says nothing: an ordinary bug read as an
    overload (the cap collapsing on a crash) fails here."""
    adaptive = Adaptive(on=(TimeoutError,)).checked("t")
    throttled = TimeoutError("503")
    throttled.retry_after = 2  # type: ignore[attr-defined]
    assert signal(adaptive, None) == ("ok", 0.0)
    assert signal(adaptive, Overloaded("x")) == ("overloaded", 0.0)
    assert signal(adaptive, TimeoutError("x")) == ("overloaded", 0.0)
    assert signal(adaptive, SlowDown(retry_after=3)) == ("slowdown", 3.0)
    assert signal(adaptive, throttled) == ("slowdown", 2.0)
    assert signal(adaptive, KeyError("bug")) is None
    assert time.time() > 0
