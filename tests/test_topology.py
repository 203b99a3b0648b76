"""The limiter on the Redis deployments people run: TLS with a password, and Sentinel."""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis
import redis.cluster
from celery import Celery
from redis.cluster import RedisCluster

from celery_throttled import ConfigurationError
from celery_throttled.settings import Settings
from celery_throttled.topology import Topology

from .conftest import Workers, wait_until
from .probes import peak
from .topologies import ClusterSetup, SentinelSetup, TLSRedis

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TLSRedis]:
    server = TLSRedis(tmp_path)
    try:  # stopped even when it fails half-way through starting
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path)
    try:
        yield setup.start()
    finally:
        setup.stop()


def run_capped(client: Celery, count: int, duration: float = 0.1) -> list[str]:
    results = [client.send_task("t.limited", (f"x{i}", duration)) for i in range(count)]
    return sorted(r.get(timeout=60) for r in results)


def test_urls_the_limiter_cannot_use_are_refused_with_the_value():
    with pytest.raises(ConfigurationError, match=r"throttle_redis_url must start with.*'http"):
        Topology.parse("http://127.0.0.1:6379")
    with pytest.raises(ConfigurationError, match="names its sentinels and the service"):
        Topology.parse("redis+sentinel://127.0.0.1:26379")
    with pytest.raises(ConfigurationError, match="bad sentinel address 'host:port'"):
        Topology.parse("redis+sentinel://host:port/mymaster")
    with pytest.raises(ConfigurationError, match="not 'socket_timeout'"):
        Topology.parse("redis+sentinel://h:26379/mymaster?socket_timeout=3")
    app = Celery(set_as_current=False)
    app.conf.throttle_redis_url = "redis+sentinel://:pw@h1,h2:26380/mymaster/2"
    app.conf.throttle_redis_options = "not a dict"
    with pytest.raises(ConfigurationError, match="throttle_redis_options must be a dict"):
        Settings.from_app(app)


def test_sentinel_url_names_hosts_service_database_and_credentials():
    topology = Topology.parse(
        "rediss+sentinel://app:pw@h1,h2:26380/mymaster/2?sentinel_password=sp&ssl_ca_certs=/ca.pem"
    )
    hosts, service, master, sentinel = topology._sentinel_parts()
    assert hosts == [("h1", 26379), ("h2", 26380)]
    assert service == "mymaster"
    assert master == {
        "db": 2,
        "username": "app",
        "password": "pw",
        "ssl": True,
        "ssl_ca_certs": "/ca.pem",
    }
    assert sentinel == {"password": "sp", "ssl": True, "ssl_ca_certs": "/ca.pem"}
    assert not topology.on_event_loop
    assert Topology.parse("redis://h:1/0").on_event_loop


def test_celerys_own_sentinel_broker_settings_name_the_limiter_too():
    # Given an app whose broker goes through Sentinel the way Celery configures it
    app = Celery(set_as_current=False)
    app.conf.broker_url = "sentinel://:pw@s1:26379/3;sentinel://s2:26380"
    app.conf.broker_transport_options = {"master_name": "orders"}
    # Then the limiter uses the same sentinels, service, database and password
    settings = Settings.from_app(app)
    assert settings.redis_url == "redis+sentinel://:pw@s1:26379,s2:26380/orders/3"
    hosts, service, master, _ = settings.topology._sentinel_parts()
    assert (hosts, service, master) == (
        [("s1", 26379), ("s2", 26380)],
        "orders",
        {"db": 3, "password": "pw"},
    )
    # And without a master name it is refused, naming what to set
    app.conf.broker_transport_options = {}
    with pytest.raises(ConfigurationError, match="set throttle_redis_url"):
        Settings.from_app(app)


@pytest.mark.parametrize(("pool", "login"), [("prefork", "password"), ("threads", "acl user")])
def test_cap_holds_on_a_tls_redis_with_a_password(
    tls_redis: TLSRedis, workers: Workers, client: Celery, probe, prefix: str, pool: str, login: str
):
    # Given workers whose limiter Redis speaks TLS only and wants a password (of the default
    # user, or of an ACL user)
    url = tls_redis.url if login == "password" else tls_redis.acl_url
    worker = workers.start(pool=pool, concurrency=4, LIMITER_URL=url)
    # Then the cap holds, and the leases lived in that Redis
    assert run_capped(client, 8) == [f"x{i}" for i in range(8)]
    assert peak(probe, prefix, "limited") == 2
    assert tls_redis.client().hget(f"{prefix}:{{t.limited}}:m", "cap") == "2"
    assert "through the threads" in worker.output()
    secret = tls_redis.password if login == "password" else tls_redis.acl_user[1]
    assert ":***@" in worker.output() and secret not in worker.output()


def test_cap_holds_through_sentinel_and_across_a_failover(
    sentinel: SentinelSetup, workers: Workers, client: Celery, probe, prefix: str
):
    """Given two workers whose limiter is the master Sentinel names, when the master fails over
    while a backlog waits for the cap, then every task still runs, never more than 2 at once,
    and tasks sent once the old master is a replica run through the new master: its counter of
    ended runs rises by each of them. Catches: a limiter that keeps talking to the old master (now a
    read-only replica), which replication alone would hide from a check of the cap."""
    for name in ("a", "b"):
        workers.start(pool="threads", concurrency=4, name=name, LIMITER_URL=sentinel.url)
    assert run_capped(client, 6) == [f"x{i}" for i in range(6)]
    first = sentinel.master_port()
    meta = f"{prefix}:{{t.limited}}:m"
    assert redis.Redis(port=first).hget(meta, "cap") == b"2"
    # When the master fails over while a backlog waits for the cap
    results = [client.send_task("t.limited", (f"y{i}", 0.3)) for i in range(16)]
    wait_until(
        lambda: len(probe.lrange(f"{prefix}:probe:limited:started", 0, -1)) >= 9,
        30,
        what="the backlog to be under way",
    )
    done = threading.Event()
    failed_over: list[int] = []

    def fail_over() -> None:
        failed_over.append(sentinel.failover())
        done.set()

    threading.Thread(target=fail_over, daemon=True).start()
    # Then every waiting task still runs (after the failover), and the cap was never exceeded
    assert sorted(r.get(timeout=90) for r in results) == sorted(f"y{i}" for i in range(16))
    assert done.wait(30) and failed_over[0] != first
    assert peak(probe, prefix, "limited") == 2
    # And the new master holds the limiter's state
    new_master = redis.Redis(port=failed_over[0])
    assert new_master.hget(meta, "cap") == b"2"
    # And once Sentinel has turned the old master into a replica (a forced failover leaves it
    # writable for some seconds), tasks sent now run through the new master
    wait_until(
        lambda: sentinel.role(first) == "slave",
        60,
        interval=0.2,
        what="Sentinel to demote the old master",
    )
    ended_before = int(new_master.hget(meta, "done") or 0)
    assert sorted(run_capped(client, 6)) == [f"x{i}" for i in range(6)]
    wait_until(
        lambda: int(new_master.hget(meta, "done") or 0) >= ended_before + 6,
        10,
        what="the new master to count the runs sent after the failover",
    )
    assert peak(probe, prefix, "limited") == 2


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSetup]:
    setup = ClusterSetup(tmp_path)
    try:
        yield setup.start()
    finally:
        setup.stop()


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_cap_holds_on_a_redis_cluster(
    cluster: ClusterSetup, workers: Workers, client: Celery, probe, prefix: str, pool: str
):
    # Given two workers whose limiter is a three-primary Redis Cluster
    for name in ("a", "b"):
        workers.start(pool=pool, concurrency=4, name=name, LIMITER_URL=cluster.url)
    # Then the cap holds across both, and every key of a family sits on one node
    assert run_capped(client, 10) == [f"x{i}" for i in range(10)]
    assert peak(probe, prefix, "limited") == 2
    nodes = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    family = [
        k.decode()
        for k in nodes.scan_iter(
            match=f"{prefix}:{{t.limited}}:*", target_nodes=RedisCluster.PRIMARIES
        )
    ]
    assert {f"{prefix}:{{t.limited}}:m", f"{prefix}:{{t.limited}}:wt"} <= set(family)
    assert len({nodes.keyslot(k) for k in family}) == 1
    assert nodes.hget(f"{prefix}:{{t.limited}}:m", "done") == b"10"
    # And per-tenant keys spread over the nodes hold their own caps
    results = [
        client.send_task("t.per_tenant", (f"tenant{i % 5}", f"p{i}", 0.05)) for i in range(20)
    ]
    assert len([r.get(timeout=60) for r in results]) == 20
    slots = {nodes.keyslot(f"{prefix}:{{tenant:tenant{i}}}:m") for i in range(5)}
    assert len({nodes.nodes_manager.get_node_from_slot(s).port for s in slots}) >= 2


def test_errgroups_and_status_on_a_redis_cluster(
    cluster: ClusterSetup, workers: Workers, client: Celery, prefix: str, redis_url: str
):
    workers.start(pool="threads", concurrency=4, LIMITER_URL=cluster.url)
    os.environ.setdefault("REDIS_URL", redis_url)
    importlib.import_module("tests.apps.throttle_app")  # the tasks, as a web app imports them
    client.conf.throttle_key_prefix = prefix
    client.conf.throttle_redis_url = cluster.url
    from celery_throttled import errgroup, inspect

    # An errgroup whose state lives in the cluster: the first error cancels the rest
    members = [client.signature("t.member", args=(f"c{i}", 5.0)) for i in range(6)]
    members[0] = client.signature("t.member", args=("c0", 5.0), kwargs={"fail_after": 0.2})
    envs = errgroup(members, limit=2).apply_async().get(timeout=30)
    assert envs[0].error is not None and envs[0].error.kind == "error"
    assert all(e.error is not None and e.error.kind == "cancelled" for e in envs[1:])
    # And the status tools read the cluster
    statuses = {s.key: s for s in inspect(client)}
    assert statuses["members"].cap == 8


def test_lease_batches_are_pipelined_per_cluster_node(cluster: ClusterSetup, prefix: str):
    from celery_throttled.keys import Family, holder_id
    from celery_throttled.transport.leases import Acquire, RedisLeases, Release

    # Given a batch of operations on keys whose slots sit on different nodes
    client = cast(RedisCluster, Topology.parse(cluster.url).client())
    leases = RedisLeases(cast(redis.Redis, client), prefix, 30.0, "w1/1/abc")
    keys = [f"k{i}" for i in range(12)]
    owners = {client.get_node_from_key(Family.of(prefix, k).meta).name for k in keys}
    assert len(owners) >= 2
    # When they run as one batch: one slot each is granted, a second holder of k0 waits
    first = leases.execute([Acquire(k, holder_id("w1/1/abc", f"t-{k}"), 1) for k in keys])
    assert all(
        outcome.granted == [holder_id("w1/1/abc", f"t-{k}")]
        for k, outcome in zip(keys, first, strict=True)
    )
    waiting = leases.execute([Acquire("k0", holder_id("w1/1/abc", "t-late"), 1)])
    assert waiting[0].granted == []
    # Then releasing them all in one batch hands k0's slot to the waiter, and nothing is left
    released = leases.execute(
        [Release(k, holder_id("w1/1/abc", f"t-{k}"), 1, "done") for k in keys]
    )
    assert all(outcome.known for outcome in released)
    assert released[0].granted == [holder_id("w1/1/abc", "t-late")]
    assert all(client.zcard(Family.of(prefix, k).holders) == 0 for k in keys[1:])
