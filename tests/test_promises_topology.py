"""The limiter on the Redis deployments the README names, live: a unix socket, Sentinel over
TLS, Celery's own Sentinel broker settings, a failover that loses writes, Cluster over TLS, a
Cluster primary restarting, and a slot moving to another node under load."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster
from celery import Celery

from .conftest import ROOT, Workers, make_client, wait_until
from .probes import leases, peak, started
from .topologies import ClusterSetup, SentinelSetup, UnixRedis

pytestmark = pytest.mark.timeout(300)


def run_capped(client: Celery, count: int, duration: float = 0.1, prefix: str = "x") -> list[str]:
    results = [client.send_task("t.limited", (f"{prefix}{i}", duration)) for i in range(count)]
    return sorted(r.get(timeout=90) for r in results)


def labels(count: int, prefix: str = "x") -> list[str]:
    return sorted(f"{prefix}{i}" for i in range(count))


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[UnixRedis]:
    server = UnixRedis(tmp_path)
    try:
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


@pytest.fixture
def tls_sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path, tls=True)
    try:
        yield setup.start()
    finally:
        setup.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSetup]:
    setup = ClusterSetup(tmp_path)
    try:
        yield setup.start()
    finally:
        setup.stop()


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[ClusterSetup]:
    setup = ClusterSetup(tmp_path, tls=True)
    try:
        yield setup.start()
    finally:
        setup.stop()


def test_cap_holds_on_a_unix_socket_limiter(
    unix_redis: UnixRedis, workers: Workers, client: Celery, probe, prefix: str
):
    """Given a prefork and a threads worker whose limiter is a Redis on a unix socket, then the
    cap holds across both and the leases live in that Redis. Catches: a ``unix://`` URL parsed
    but sent to TCP (or refused) by the limiter."""
    for pool in ("prefork", "threads"):
        worker = workers.start(pool=pool, concurrency=4, LIMITER_URL=unix_redis.url)
        assert "through the threads" in worker.output()
    assert run_capped(client, 8) == labels(8)
    assert peak(probe, prefix, "limited") == 2
    assert unix_redis.client().hget(f"{prefix}:{{t.limited}}:m", "done") == "8"


def test_cap_holds_through_sentinel_over_tls(
    tls_sentinel: SentinelSetup, workers: Workers, client: Celery, probe, prefix: str
):
    """Given a prefork and a threads worker whose limiter is named by a ``rediss+sentinel://``
    URL (sentinels and master speaking TLS only), then the cap holds across both and the leases
    live in the master. Catches: TLS options given to the master but not to the sentinels (or
    the reverse), and a Sentinel limiter that fails in prefork workers."""
    for pool in ("prefork", "threads"):
        workers.start(pool=pool, concurrency=4, LIMITER_URL=tls_sentinel.url)
    assert run_capped(client, 8) == labels(8)
    assert peak(probe, prefix, "limited") == 2
    master = tls_sentinel.client(tls_sentinel.master_port())
    assert master.hget(f"{prefix}:{{t.limited}}:m", "done") == b"8"


def test_celerys_own_sentinel_broker_settings_name_the_limiter_live(
    sentinel: SentinelSetup, workers: Workers, probe, prefix: str, redis_url: str
):
    """Given workers whose broker is Celery's ``sentinel://`` URL with ``master_name`` and no
    ``throttle_redis_url``, then tasks sent through that broker run under the cap, and the
    limiter's leases live in the master those sentinels name. Catches: the derived Sentinel URL
    right on paper but unusable by a running worker."""
    broker = sentinel.kombu_url
    client = make_client(broker, redis_url, prefix)
    client.conf.broker_transport_options = {"master_name": sentinel.service}
    workers.client = client
    try:
        env: dict[str, Any] = {
            "BROKER_URL": broker,
            "BROKER_MASTER": sentinel.service,
            "LIMITER_URL": "-",
        }
        for pool in ("prefork", "threads"):
            worker = workers.start(pool=pool, concurrency=4, **env)
            assert "uses the limiter at redis+sentinel://" in worker.output()
        assert run_capped(client, 8) == labels(8)
        assert peak(probe, prefix, "limited") == 2
        master = sentinel.client(sentinel.master_port())
        assert master.hget(f"{prefix}:{{t.limited}}:m", "done") == b"8"
    finally:
        client.close()


#: what a worker logs once it is back on a Redis that lost its leases
NOTICED = ("is a new server", "reachable again")


def lose_leases_under_load(
    workers: Workers,
    client: Celery,
    probe,
    prefix: str,
    url: str,
    limiter: redis.Redis | redis.cluster.RedisCluster,
    lose: Callable[[], None],
    before: Callable[[], None] = lambda: None,
) -> None:
    """After ``before``, worker A runs 2 tasks at a cap of 2 and worker B holds 4 waiters; A
    stalls while ``lose`` makes the limiter lose every lease; A resumes once B has noticed (or
    has admitted a waiter), within B's grace. Every task must run once, never more than 2 at
    once, and A must put its leases back."""
    env: dict[str, Any] = {"LIMITER_URL": url, "LEASE_TTL": 9}
    a = workers.start(pool="prefork", concurrency=2, name="a", **env)
    before()
    running = [client.send_task("t.limited_late", (f"r{i}", 10.0)) for i in range(2)]
    wait_until(lambda: len(started(probe, prefix, "limited")) == 2, 30, what="A to run 2")
    b = workers.start(pool="threads", concurrency=4, name="b", **env)  # A's window is full
    waiting = [client.send_task("t.limited", (f"y{i}", 0.2)) for i in range(4)]
    wait_until(lambda: leases(limiter, prefix, "t.limited") == {"holders": 2, "waiters": 4}, 30,
               what="B to hold 4 waiters")  # fmt: skip
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        lose()
        wait_until(lambda: any(said in b.output() for said in NOTICED)
                   or len(started(probe, prefix, "limited")) > 2, 30,
                   what="B to notice")  # fmt: skip
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    done = sorted(r.get(timeout=90) for r in running + waiting)
    assert done == ["r0", "r1", "y0", "y1", "y2", "y3"]
    assert peak(probe, prefix, "limited") == 2
    assert "had vanished from Redis and were put back" in a.output()


def test_a_restart_of_a_unix_socket_limiter_keeps_the_cap(
    unix_redis: UnixRedis, workers: Workers, client: Celery, probe, prefix: str
):
    """Given two tasks running under leases and four waiting, on a limiter Redis reached through
    the threads transport (a unix socket), when that Redis restarts empty, then the running
    leases are put back before any waiter is admitted: never more than 2 run. Catches: grants
    on a Redis that came back empty before every worker re-asserted its running leases."""
    lose_leases_under_load(workers, client, probe, prefix, unix_redis.url, unix_redis.client(),
                           unix_redis.restart)  # fmt: skip


def test_a_failover_that_loses_writes_keeps_the_cap(
    sentinel: SentinelSetup, workers: Workers, client: Celery, probe, prefix: str
):
    """Given two tasks running (one on a prefork worker) and four waiting through Sentinel, whose
    leases the replica never received (its replication cut), when the master dies and the
    replica takes over without them, then the workers put the running leases back before any
    waiter is admitted: never more than 2 run, and every task runs once. Catches: a failover
    that loses writes treated as a mere reconnection, so the new master grants slots in use."""
    old = sentinel.master_port()
    replica = next(s for s in sentinel.servers if s.port != old)

    def cut() -> None:
        replica.pause()  # nothing more the master takes reaches the replica, not even the
        sentinel.client(old).client_kill_filter(_type="replica")  # kernel's socket buffers
        sentinel.client(old).set(f"{prefix}:unreplicated", 1)

    def lose() -> None:
        sentinel.server(old).kill()
        replica.resume()
        assert sentinel.wait_new_master(old, timeout=60) == replica.port
        assert not sentinel.client(replica.port).exists(f"{prefix}:unreplicated")

    lose_leases_under_load(workers, client, probe, prefix, sentinel.url,
                           sentinel.client(old, decode_responses=True), lose, cut)  # fmt: skip


def test_a_cluster_primary_restarting_empty_keeps_the_cap(
    cluster: ClusterSetup, workers: Workers, client: Celery, probe, prefix: str
):
    """Given two tasks running and four waiting under leases held on one Cluster primary, when
    that primary restarts with its data lost, then the workers put the running leases back
    before any waiter is admitted: never more than 2 run, and every task runs once. Catches: a
    restart of one primary not noticed, so its empty slot grants slots that are in use."""
    owner = cluster.owner(cluster.keyslot(f"{prefix}:{{t.limited}}:m"))
    lose_leases_under_load(workers, client, probe, prefix, cluster.url,
                           cluster.cluster_client(), lambda: cluster.restart(owner))  # fmt: skip


def test_cap_holds_on_a_tls_cluster(
    tls_cluster: ClusterSetup, workers: Workers, client: Celery, probe, prefix: str
):
    """Given a prefork and a threads worker whose limiter is a ``rediss+cluster://`` Cluster
    (TLS only, the cluster bus too), then the cap holds across both and the key's family sits
    in one slot. Catches: TLS options lost when the cluster client opens its per-node
    connections."""
    for pool in ("prefork", "threads"):
        workers.start(pool=pool, concurrency=4, LIMITER_URL=tls_cluster.url)
    assert run_capped(client, 8) == labels(8)
    assert peak(probe, prefix, "limited") == 2
    nodes = tls_cluster.cluster_client()
    assert nodes.hget(f"{prefix}:{{t.limited}}:m", "done") == b"8"


def test_a_slot_moving_under_load_keeps_the_cap(
    cluster: ClusterSetup, workers: Workers, client: Celery, probe, prefix: str
):
    """Given a backlog at a cap of 2 on a Cluster, when the slot of the key's family moves to
    another primary while the backlog runs, then every task runs once, never more than 2 at
    once, and the runs after the move are counted on the new owner. Catches: lease operations
    that fail (or are lost) once their slot is migrating or has moved."""
    for name in ("a", "b"):
        workers.start(pool="threads", concurrency=4, name=name, LIMITER_URL=cluster.url)
    meta = f"{prefix}:{{t.limited}}:m"
    assert run_capped(client, 2) == labels(2)
    slot = cluster.keyslot(meta)
    target = next(n.port for n in cluster.nodes if n.port != cluster.owner(slot))
    backlog = [client.send_task("t.limited", (f"y{i}", 0.3)) for i in range(12)]
    wait_until(lambda: len(started(probe, prefix, "limited")) >= 5, 30, what="the backlog")
    cluster.move_slot(slot, target)
    assert cluster.client(target).exists(meta) == 1
    assert sorted(r.get(timeout=90) for r in backlog) == labels(12, "y")
    assert run_capped(client, 4, prefix="z") == labels(4, "z")
    assert int(cluster.client(target).hget(meta, "done") or 0) == 2 + 12 + 4
    assert peak(probe, prefix, "limited") == 2
    assert leases(cluster.cluster_client(), prefix, "t.limited") == {"holders": 0, "waiters": 0}


def test_no_server_writes_into_the_checkout():
    """After the topology tests above ran in this process, no Redis dump or node file is in the
    checkout. Catches: a server started without a working directory of its own."""
    assert sorted(p.name for p in ROOT.glob("*.rdb")) == []
    assert sorted(p.name for p in ROOT.glob("nodes-*.conf")) == []
