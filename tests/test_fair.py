"""Fair shares across the keys of a family, with real Redis and real worker processes."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import redis.cluster
from celery import Celery
from redis.cluster import RedisCluster

import tests.apps.flow_app  # noqa: F401  (registers the f.* tasks on every app)
from celery_throttled import ConfigurationError, KeyFunctionError, throttled_task
from celery_throttled.keys import Family, family_key

from .conftest import Workers, wait_until
from .probes import finished, peak, reported, started
from .test_topology import cluster  # noqa: F401  (the three-primary Redis Cluster fixture)
from .topologies import ClusterSetup

pytestmark = pytest.mark.timeout(240)


def big_beside_small(client: Celery, probe, prefix: str, task: str) -> list[str]:
    """One tenant queues 24 x 0.2 s; once 3 run, three small tenants queue 2 each. Returns the
    tenants in the order their tasks started after the small ones were submitted."""
    big = [client.send_task(task, ("big", f"b{i}", 0.2)) for i in range(24)]
    wait_until(lambda: len(started(probe, prefix, "fair")) >= 3, 30, what="three to run")
    before = len(started(probe, prefix, "fair"))
    small = [
        client.send_task(task, (t, f"{t}{i}", 0.2)) for t in ("s1", "s2", "s3") for i in range(2)
    ]
    for result in big + small:
        result.get(timeout=90)
    after = [label.split(":", 1)[0] for label, _ in started(probe, prefix, "fair")[before:]]
    assert len(after) == 24 + 6 - before
    return after


def test_a_big_tenant_does_not_put_small_ones_behind_its_backlog(
    workers: Workers, client, probe, prefix
):
    """Given limit=3, total=3 per tenant key (one family), and the same work behind one shared
    key (first come first served),
    When one tenant has queued 24 tasks and three small tenants queue 2 each,
    Then in the family every small task starts within the next 9 starts (they take turns with
    the big tenant), while behind the shared key they start only after the big backlog; the
    family never runs more than 3: a freed slot handed to the oldest waiter overall, or a total
    not held across keys, fails here."""
    workers.start(pool="threads", concurrency=8)
    workers.start(pool="prefork", concurrency=4)
    fair = big_beside_small(client, probe, prefix, "f.tenant")
    assert peak(probe, prefix, "fair") == 3
    assert sum(1 for tenant in fair[:9] if tenant != "big") == 6, fair
    probe.delete(*[f"{prefix}:probe:fair:{k}" for k in ("started", "finished", "peak", "now")])
    fifo = big_beside_small(client, probe, prefix, "f.fifo")
    assert all(tenant == "big" for tenant in fifo[:15]), fifo
    print(f"\nstarts after the small tenants queued\n  family: {fair}\n  shared key: {fifo}")


def test_task_types_naming_one_family_share_its_total(
    workers: Workers, client, probe, prefix, redis_url
):
    """Given two task types in family="reports" (total 2), each tenant key capped at 1,
    When both types queue work for three tenants,
    Then the family never runs more than 2 and no tenant more than 1: a total kept per task
    type (4), or per-key caps ignored inside the family, fails here."""
    workers.start(pool="threads", concurrency=8)
    results = [
        client.send_task(name, (t, f"{t}{i}", 0.1))
        for i in range(4)
        for t in ("a", "b", "c")
        for name in ("f.report", "f.export")
    ]
    for result in results:
        result.get(timeout=60)
    assert peak(probe, prefix, "reports") == 2
    assert max(peak(probe, prefix, f"reports:{t}") for t in "abc") == 1
    # And operators see each key with its family, named by its key or as FAMILY/KEY
    from celery_throttled.status import inspect

    from .test_cli import limiter_app, run

    app = limiter_app(redis_url, prefix)
    (status,) = inspect(app, ["tenant:a"])
    assert (status.key, status.family, status.total, status.cap) == ("tenant:a", "reports", 2, 1)
    assert status.done == 8 and status.family_running == 0
    out = run(app, "status", "reports/tenant:b").output
    assert "reports/tenant:b" in out and "family reports, 0 running of its total 2" in out, out
    assert run(app, "set", "tenant:c", "2").exit_code == 0
    assert inspect(app, ["tenant:c"])[0].cap == 2


def test_a_freed_slot_of_a_family_goes_to_another_key_as_the_body_ends(
    workers: Workers, client, probe, prefix
):
    """Given a family of total 1 whose tenant keys have no cap of their own (room to spare),
    and a task whose process spends a second after its body (before the worker's main process
    hears of the end), when a second tenant's task queues behind it, then that task starts after
    the first body ended and before the first run was reported. Catches: a family's slot left
    for its worker to free, its key's own room taken for the family's (the second tenant waits
    until the worker hears of the end)."""
    workers.start(pool="prefork", concurrency=2)
    first = client.send_task("f.family_handover", ("a", "a", 0.3))
    wait_until(
        lambda: started(probe, prefix, "family_handover"), 30, what="the first body to start"
    )
    second = client.send_task("f.family_handover", ("b", "b"))
    assert [first.get(timeout=30), second.get(timeout=30)] == ["a", "b"]
    wait_until(
        lambda: len(reported(probe, prefix, "family_handover")) == 2, 30, what="both reports"
    )
    begun = dict(started(probe, prefix, "family_handover"))
    ended = dict(finished(probe, prefix, "family_handover"))
    assert ended["a"] <= begun["b"] < dict(reported(probe, prefix, "family_handover"))["a"]
    assert peak(probe, prefix, "family_handover") == 1


def test_a_key_of_weight_two_takes_two_turns_for_each_turn_of_a_weight_one_key(
    workers: Workers, client, probe, prefix
):
    """Given total=1 over tenant keys, a weight function giving tenant "vip" weight 2 and "std"
    weight 1, and the only slot held,
    When vip queues six and std three, and the slot frees,
    Then they start std, vip, vip, std, vip, vip, std, vip, vip (both never served: std goes
    first by name): weights ignored (std and vip alternating) fails here."""
    workers.start(pool="threads", concurrency=12)
    blocker = client.send_task("f.weighted", ("block", "b", True))

    def keys(tenant: str) -> Family:
        return Family.of(prefix, family_key("f.weighted", f"tenant:{tenant}"))

    def waiting(tenant: str) -> int:
        return int(probe.zcard(keys(tenant).waiters))

    running = keys("block").total  # the family's hash: its total and how many run
    wait_until(lambda: probe.hget(running, "running") == "1", 30, what="the blocker to run")
    results = [client.send_task("f.weighted", ("vip", f"v{i}")) for i in range(6)]
    results += [client.send_task("f.weighted", ("std", f"s{i}")) for i in range(3)]
    wait_until(lambda: (waiting("vip"), waiting("std")) == (6, 3), 30, what="every task to wait")
    probe.rpush(f"{prefix}:probe:release", "go")
    for result in [blocker, *results]:
        result.get(timeout=60)
    order = [label.split(":")[0] for label, _ in started(probe, prefix, "weighted")][1:]
    assert order == ["std", "vip", "vip", "std", "vip", "vip", "std", "vip", "vip"], order


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weight": 0}, "weight must be a positive int or a callable"),
        ({"weight": -1}, "got -1"),
        ({"weight": 2.5}, "got 2.5"),
        ({"weight": "2"}, "got '2'"),
        ({"weight": True}, "got True"),
    ],
)
def test_bad_weights_are_refused_at_decoration_naming_task_and_value(options, message):
    """Given a bad weight, When the task is decorated, Then ConfigurationError names the task
    and the value: a bad weight accepted (and found only in a worker) fails here."""
    with pytest.raises(ConfigurationError, match=message) as info:

        @throttled_task(limit=1, total=2, name="api.bad_weight", **options)
        def task() -> None: ...

    assert "api.bad_weight" in str(info.value)


def test_tasks_sharing_a_key_in_a_family_must_agree_on_its_weight():
    """Given a task giving the static key "vip" weight=3 in family "weights",
    When another task of that family declares weight=2 on "vip", or none (weight 1),
    Then ConfigurationError names both tasks, the setting and both values: two weights that the
    lease scripts would each write into the key's meta (the last run's winning) fail here. The
    same weight, or the same key in another family (another key in Redis), is accepted."""

    @throttled_task(total=4, family="weights", key="vip", weight=3, name="api.weight_one")
    def one() -> None: ...

    def body() -> None: ...

    for weight, shown in ((2, "weight=2"), (None, "weight=1")):
        with pytest.raises(ConfigurationError) as info:
            throttled_task(total=4, family="weights", key="vip", weight=weight, name="api.w2")(body)
        message = str(info.value)
        assert "'api.w2'" in message and "'api.weight_one'" in message, message
        assert "weight=3" in message and shown in message and "'vip'" in message, message

    throttled_task(total=4, family="weights", key="vip", weight=3, name="api.w3")(body)
    throttled_task(total=4, family="other", key="vip", weight=2, name="api.w4")(body)
    throttled_task(total=4, family="weights", key="std", name="api.w5")(body)


def test_a_weight_without_a_total_is_refused_at_decoration():
    with pytest.raises(ConfigurationError, match=r"api\.lone_weight.*weight=2 needs total"):

        @throttled_task(limit=1, weight=2, name="api.lone_weight")
        def task() -> None: ...


def test_a_weight_function_that_raises_or_returns_a_bad_weight_fails_the_run():
    """Given a weight function of the task's arguments, When a run's rules are resolved, Then
    a positive int is that run's weight, and a function that raises or returns anything else
    raises KeyFunctionError naming the task and the value (the worker records the run as
    failed, as for a bad key): a bad weight passed on to the lease scripts fails here."""

    def weigh(n: int, **kwargs: Any) -> int:
        if n < 0:
            raise ValueError("no negative weights")
        return n

    @throttled_task(limit=1, total=2, weight=weigh, name="api.weight_fn")
    def task(n: int) -> None: ...

    rules = task.throttle_admission_for((3,), {})
    assert rules is not None and rules.weight == 3
    for args, message in (((0,), "returned 0"), ((-1,), "raised"), (("2",), "raised")):
        with pytest.raises(KeyFunctionError, match=message) as info:
            task.throttle_admission_for(args, {})
        assert "api.weight_fn" in str(info.value)


def test_a_family_holds_on_a_redis_cluster(
    workers: Workers,
    client,
    probe,
    prefix,
    cluster: ClusterSetup,  # noqa: F811
):
    """Given a limiter on a three-primary Redis Cluster,
    When a family's tenants run side by side, Then its total holds and every key of the family
    lives in one slot (the family's hash tag): keys of a family spread over slots (a script
    refused, or a total that cannot be counted) fail here."""
    for name in ("a", "b"):
        workers.start(pool="threads", concurrency=6, name=name, LIMITER_URL=cluster.url)
    results = [
        client.send_task("f.tenant", (t, f"{t}{i}", 0.1)) for i in range(4) for t in ("x", "y", "z")
    ]
    for result in results:
        result.get(timeout=60)
    assert peak(probe, prefix, "fair") == 3
    nodes = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    family = [
        k.decode()
        for k in nodes.scan_iter(
            match=f"{prefix}:{{fam:f.tenant}}:*", target_nodes=RedisCluster.PRIMARIES
        )
    ]
    assert {f"{prefix}:{{fam:f.tenant}}:t", f"{prefix}:{{fam:f.tenant}}:k:tenant:x:m"} <= set(
        family
    )
    assert len({nodes.keyslot(k) for k in family}) == 1
    assert nodes.hget(f"{prefix}:{{fam:f.tenant}}:t", "running") == b"0"


def test_rates_and_backpressure_hold_on_a_redis_cluster(
    workers: Workers,
    client,
    probe,
    prefix,
    cluster: ClusterSetup,  # noqa: F811
):
    """Given a limiter on a three-primary Redis Cluster (the threaded transport),
    When a rate="5/s" backlog runs over two workers and a max_pending=6 key is filled,
    Then the rate holds (woken through the threads, not only at renewals) and the seventh
    submission is refused: a wake-up lost on the threaded transport, or a pending set the
    cluster client cannot reach, fails here."""
    from celery_throttled import Backpressure

    from .test_rate import most_in_any_window

    for name in ("a", "b"):
        workers.start(pool="threads", concurrency=4, name=name, LIMITER_URL=cluster.url)
    results = [client.send_task("f.rated", (f"r{i}",)) for i in range(10)]
    assert [r.get(timeout=60) for r in results] == [f"r{i}" for i in range(10)]
    stamps = [stamp for _, stamp in started(probe, prefix, "rated")]
    assert most_in_any_window(stamps, 1.0) <= 6, sorted(stamps)
    assert max(b - a for a, b in itertools.pairwise(sorted(stamps))) < 5  # renewals: every 10 s
    client.conf.update(throttle_key_prefix=prefix, throttle_redis_url=cluster.url)
    bounded = client.tasks["f.bounded"]
    sent = [bounded.delay(f"b{i}", 0.5) for i in range(6)]
    with pytest.raises(Backpressure):
        bounded.delay("one too many")
    for result in sent:
        assert result.get(timeout=60).ok
