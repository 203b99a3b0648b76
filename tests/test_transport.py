"""The lease transport's contract, held by both transports against a real Redis.

Every test runs twice: on the worker's event loop (a kombu ``Hub`` on a thread here) and on the
two background threads. What the gate relies on: acquires granted up to the cap or reported
waiting, grants from releases elsewhere delivered through pub/sub, idempotent releases, renewals
that extend, restore and find missed grants, the grace after a Redis restart, expired foreign
leases reported lost exactly once, and ``throttle_redis_options`` on every connection.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_throttled.keys import Family, registry
from celery_throttled.transport.leases import Acquire, RedisLeases, Release, Renew

from .conftest import RedisServer, wait_until
from .probes import script_calls
from .transports import (
    KINDS,
    Loop,
    Opened,
    Side,
    local_ports_to,
    open_transport,
    process_sockets_to,
    ready,
)

pytestmark = pytest.mark.timeout(120)

Open = Callable[..., Side]

#: the grace after a restart for a lease TTL of 3 s: min(1 s, TTL / 3)
GRACE = 1.0


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.close()


@pytest.fixture
def server(private_redis: RedisServer) -> RedisServer:
    return private_redis


@pytest.fixture
def probe(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, decode_responses=True, client_name="probe")


@pytest.fixture
def open_side(
    kind: str, loop: Loop, server: RedisServer, prefix: str, probe: redis.Redis
) -> Iterator[Open]:
    opened: list[Opened] = []

    def open_(
        name: str = "w",
        lease_ttl: float = 30.0,
        options: dict[str, Any] | None = None,
        wait_ready: bool = True,
    ) -> Side:
        side = Side(name)
        opened.append(open_transport(kind, loop, server.url, prefix, side, lease_ttl, options))
        if wait_ready:
            ready(side, probe, prefix)
        return side

    yield open_
    for each in opened:
        each.close()


def other_worker(server: RedisServer, prefix: str, lease_ttl: float = 30.0) -> RedisLeases:
    """Another worker's lease operations, sent straight through redis-py."""
    return RedisLeases(redis.Redis(port=server.port), prefix, lease_ttl, "other/1/abc")


def members(probe: redis.Redis, zset: str) -> set[str]:
    return {str(member) for member in probe.zrange(zset, 0, -1)}


def test_acquires_are_granted_up_to_the_cap_then_wait(open_side: Open, probe, prefix):
    """Given a cap of 2, when three holders ask, then two are granted and the third is reported
    waiting; when one is released, the waiter of the same worker is granted from the script's
    reply (no pub/sub). Catches: a transport that drops outcomes, reports a grant as a wait or
    loses the order of operations."""
    side = open_side()
    a, b, c = (side.acquire("k", t, 2) for t in ("a", "b", "c"))
    side.wait_for("granted", "k", a)
    side.wait_for("granted", "k", b)
    side.wait_for("waiting", "k", c)
    assert side.seen("granted", "k", c) == 0
    messages = side.messages
    side.release("k", "a")
    side.wait_for("granted", "k", c)
    assert side.messages == messages
    assert members(probe, Family.of(prefix, "k").holders) == {b, c}


def test_a_release_elsewhere_is_delivered_through_the_grant_channel(
    open_side: Open, server, probe, prefix
):
    """Given another worker holding the only slot and a holder here waiting for it, when the
    other worker releases, then the grant reaches this worker through its pub/sub channel
    (renewals come every 10 s here, far beyond the wait). Catches: a transport that does not
    listen, or only learns of grants by renewal."""
    other = other_worker(server, prefix)
    assert other.execute([Acquire("k", "other/1/abc t", 1)])[0].granted
    side = open_side()
    mine = side.acquire("k", "mine", 1)
    side.wait_for("waiting", "k", mine)
    messages = side.messages
    assert other.execute([Release("k", "other/1/abc t", 1)])[0].granted == []
    side.wait_for("granted", "k", mine, timeout=5)
    assert side.messages > messages
    assert members(probe, Family.of(prefix, "k").holders) == {mine}


def test_a_second_release_frees_nothing_more(open_side: Open, probe, prefix):
    """Given a cap of 1, one holder running and two waiting, when the running one is released
    twice, then exactly one waiter is granted and the other still waits. Catches: a transport
    that turns a repeated release into a second free slot."""
    side = open_side()
    _, b, c = (side.acquire("k", t, 1) for t in ("a", "b", "c"))
    side.wait_for("waiting", "k", c)
    side.release("k", "a")
    side.release("k", "a")
    barrier = side.acquire("barrier", "x", 1)  # operations are carried in order
    side.wait_for("granted", "barrier", barrier)
    side.wait_for("granted", "k", b)
    assert side.seen("granted", "k", c) == 0
    family = Family.of(prefix, "k")
    assert (members(probe, family.holders), members(probe, family.waiters)) == ({b}, {c})


def test_a_release_sent_later_goes_with_the_next_renewal_round(open_side: Open, probe, prefix):
    """Given a cap of 1, one holder running and one waiting, when the running one's release is
    submitted ``later`` (the worker's safety net after its pool process freed the slot), then
    operations submitted after it go out first, and the release goes with the next renewal
    round. Catches: a safety-net release never sent (the slot of a lost pool process leaks), or
    sent on the hand-off's path."""
    side = open_side()
    a, b = side.acquire("k", "a", 1), side.acquire("k", "b", 1)
    side.wait_for("granted", "k", a)
    side.wait_for("waiting", "k", b)
    side.release("k", "a", later=True)
    barrier = side.acquire("barrier", "x", 1)
    side.wait_for("granted", "barrier", barrier)
    assert side.seen("granted", "k", b) == 0
    side.transport.renew_soon()
    side.wait_for("granted", "k", b)
    assert members(probe, Family.of(prefix, "k").holders) == {b}


def test_releases_sent_later_ride_in_one_renewal_per_key(open_side: Open, server, probe, prefix):
    """Given 40 holders of one key, half freed by their pool process as the body ended and half
    not (a pool process whose release failed), and a waiter, when the worker releases all 40
    ``later``, then the next round frees the other 20 with one script call for the key (not one
    each), counts each run's outcome once, grants the waiter, and leaves no ended mark behind.
    Catches: safety-net releases that cost a script call each, a holder its pool process did not
    free left holding its slot, or an outcome counted twice."""
    side = open_side()
    tasks = [f"t{i}" for i in range(40)]
    running = [side.acquire("k", task, 40) for task in tasks]
    for holder in running:
        side.wait_for("granted", "k", holder)
    waiter = side.acquire("k", "waiter", 40)  # the 41st: it waits
    side.wait_for("waiting", "k", waiter)
    pool = RedisLeases(redis.Redis(port=server.port), prefix, 30.0, worker="")
    pool.execute([Release("k", h, 0, "done", spec="40", ending=True) for h in running[:20]])
    side.wait_for("granted", "k", waiter)  # published by the pool's releases
    family = Family.of(prefix, "k")
    before = script_calls(probe)
    for task in tasks:
        side.release("k", task, later=True)
    barrier = side.acquire("barrier", "x", 1)
    side.wait_for("granted", "barrier", barrier)
    assert members(probe, family.holders) >= set(running[20:])  # nothing went before the round
    side.transport.renew_soon()
    wait_until(lambda: not probe.exists(family.ended), 10, what="the ended marks to go")
    wait_until(lambda: members(probe, family.holders) == {waiter}, 10, what="20 slots freed")
    # the barrier, then one renewal per key this worker has (k, barrier, its warm-up key)
    assert script_calls(probe) - before <= 1 + 3
    assert probe.hget(family.meta, "done") == "40"


def test_releases_sent_later_ride_in_the_next_acquire_of_their_key(
    open_side: Open, server, probe, prefix
):
    """Given 10 holders of a key, 5 of them freed by their pool process, all released ``later``
    by their worker, when the worker asks for a slot of the key at a cap of 5, then that one
    script call, long before the next renewal round, frees the other 5 first and is granted,
    leaving no ended mark. Catches: the worker's releases waiting for the round (a script call
    per key, up to lease_ttl / 3 late) while an acquire of their key goes out anyway, or handled
    after the acquire (refused: the cap looks full)."""
    side = open_side(lease_ttl=60.0)  # rounds every 20 s: none comes during the test
    running = [side.acquire("k", f"t{i}", 10) for i in range(10)]
    for holder in running:
        side.wait_for("granted", "k", holder)
    pool = RedisLeases(redis.Redis(port=server.port), prefix, 60.0, worker="")
    pool.execute([Release("k", h, 0, "done", spec="10", ending=True) for h in running[:5]])
    for i in range(10):
        side.release("k", f"t{i}", later=True)
    rounds, before = side.snapshots, script_calls(probe)
    new = side.acquire("k", "new", 5)
    side.wait_for("granted", "k", new)
    assert (script_calls(probe) - before, side.snapshots) == (1, rounds)
    family = Family.of(prefix, "k")
    assert members(probe, family.holders) == {new}
    assert not probe.exists(family.ended)
    assert probe.hget(family.meta, "done") == "10"


def test_a_release_not_sent_later_goes_at_once_beside_releases_waiting_for_the_round(
    open_side: Open, probe, prefix
):
    """Given a cap of 2 held by two holders and a waiter, when one holder is released ``later``
    (its pool process freed it, as far as the worker knows) and the other at once (its run ended
    without its pool process: lost, hard time limit, revoked), then the waiter is granted at
    once, long before the next round, and the first still holds its slot until then. Catches: a
    release made to wait with the releases of its key waiting for the round."""
    side = open_side(lease_ttl=60.0)  # rounds every 20 s: none comes during the test
    a, _, c = (side.acquire("k", t, 2) for t in ("a", "b", "c"))
    side.wait_for("waiting", "k", c)
    rounds = side.snapshots
    side.release("k", "a", later=True)
    side.release("k", "b")
    side.wait_for("granted", "k", c, timeout=5)
    assert side.snapshots == rounds
    assert members(probe, Family.of(prefix, "k").holders) == {a, c}


def test_releases_carried_by_a_renewal_survive_a_script_flush(open_side: Open, probe, prefix):
    """Given a holder released ``later`` whose pool process did not free it, and a waiter, when
    the server's scripts are flushed before the round carries that release, then the release
    still goes (again, with its script's source), freeing the slot for the waiter. Catches: the
    releases lost with the renewal that carried them (a renewal is never sent again)."""
    side = open_side()
    a, b = side.acquire("k", "a", 1), side.acquire("k", "b", 1)
    side.wait_for("granted", "k", a)
    side.wait_for("waiting", "k", b)
    side.release("k", "a", later=True)
    probe.script_flush()
    side.transport.renew_soon()
    side.wait_for("granted", "k", b)
    assert members(probe, Family.of(prefix, "k").holders) == {b}


def test_a_release_sent_later_never_frees_the_slot_of_a_retry(
    open_side: Open, server, probe, prefix
):
    """Given a holder freed by its pool process as the body ended, whose worker's own release
    waits for the next round, when the same holder (a retry of the task on the same worker)
    acquires again and the round then goes, then the retry keeps its new slot. Catches: the
    last run's release, sent after the retry's acquire, freeing the slot the retry runs in."""
    side = open_side()
    a = side.acquire("k", "a", 1)
    side.wait_for("granted", "k", a)
    pool = RedisLeases(redis.Redis(port=server.port), prefix, 30.0, worker="")
    pool.execute([Release("k", a, 0, "retried", spec="1", ending=True)])
    side.release("k", "a", later=True)
    side.acquire("k", "a", 1)
    wait_until(lambda: side.seen("granted", "k", a) == 2, 10, what="the retry's grant")
    side.transport.renew_soon()
    side.wait_rounds(1)
    barrier = side.acquire("barrier", "x", 1)  # the round went before it
    side.wait_for("granted", "barrier", barrier)
    assert members(probe, Family.of(prefix, "k").holders) == {a}
    b = side.acquire("k", "b", 1)
    side.wait_for("waiting", "k", b)


def test_renewals_keep_a_running_lease_past_its_ttl(open_side: Open, probe, prefix):
    """Given a lease TTL of 0.9 s, when a holder runs past the expiry its lease was first given,
    then its lease is still there, pushed forward. Catches: a transport that stops renewing."""
    side = open_side(lease_ttl=0.9)
    a = side.acquire("k", "a", 1)
    side.wait_for("granted", "k", a)
    holders = Family.of(prefix, "k").holders
    first = float(probe.zscore(holders, a))

    def redis_ms() -> float:
        seconds, micros = probe.time()
        return float(seconds) * 1000 + float(micros) / 1000

    wait_until(lambda: redis_ms() > first + 300, 10, what="the first expiry to pass")
    assert float(probe.zscore(holders, a) or 0) > first


def test_renewals_restore_vanished_leases_and_find_missed_grants(
    open_side: Open, server, probe, prefix
):
    """Given a running holder and a waiting one, when Redis loses their key family, then the
    next renewal puts both back; and when a waiter's grant message was missed (granted in Redis,
    nothing published), the next renewal reports it granted. Catches: a transport whose renewals
    leave lost leases uncounted, or waiters forever waiting for a message that never comes."""
    side = open_side(lease_ttl=0.9)
    a, b = side.acquire("k", "a", 1), side.acquire("k", "b", 1)
    side.wait_for("waiting", "k", b)
    family = Family.of(prefix, "k")
    probe.delete(*family.all())
    wait_until(
        lambda: members(probe, family.holders) == {a} and members(probe, family.waiters) == {b},
        10,
        what="the leases to be put back",
    )
    # a grant whose message this worker missed: b holds the slot in Redis, nothing published
    messages = side.messages
    with probe.pipeline() as pipe:
        pipe.zrem(family.holders, a).zrem(family.waiters, b).zrem(family.waiter_expiry, b)
        pipe.zadd(family.holders, {b: (time.time() + 30) * 1000})
        pipe.execute()
    side.wait_for("granted", "k", b)
    assert side.messages == messages


def test_acquires_wait_out_the_grace_after_a_restart(open_side: Open, server, probe, prefix):
    """Given a cap of 2 held by a task here and one of another worker, and a lease TTL of 3 s
    (grace: 1 s), when Redis restarts empty while this worker asks for a slot (once during the
    outage, once after), then its first renewal puts its own running lease back at once, but
    nothing of its waiting line reaches Redis, by acquire or by renewal, before the grace has
    passed since the restart; the other worker, putting its lease back after that renewal, keeps
    it, and only its release grants the slot. Catches: a transport that sends acquires, or
    renews waiters (which grants them), to a restarted Redis before the other workers' running
    tasks are counted again: the cap would be exceeded."""
    side = open_side(lease_ttl=3.0)
    other = other_worker(server, prefix, lease_ttl=3.0)
    assert other.execute([Acquire("k", "other/1/abc t", 2)])[0].granted
    mine = side.acquire("k", "mine", 2)
    side.wait_for("granted", "k", mine)
    server.stop()
    during = side.acquire("k", "during", 2)
    restarting = time.monotonic()  # this worker cannot see the new Redis before this moment
    server.start()
    after = side.acquire("k", "after", 2)
    # once this worker's first renewal has run, the other worker puts its lease back too
    family = Family.of(prefix, "k")
    wait_until(
        lambda: mine in members(probe, family.holders),
        10,
        what="this worker to put its running lease back",
    )
    other.execute([Renew("k", 2, running=["other/1/abc t"])])
    side.wait_for("waiting", "k", during)
    side.wait_for("waiting", "k", after)
    for holder in (during, after):
        assert side.seen("granted", "k", holder) == 0
        assert side.first[("waiting", "k", holder)] - restarting >= GRACE
    assert members(probe, family.holders) == {mine, "other/1/abc t"}
    # and the line works: the other's release grants the first in line, through pub/sub
    other.execute([Release("k", "other/1/abc t", 2)])
    side.wait_for("granted", "k", during)
    assert side.seen("granted", "k", after) == 0


def test_an_expired_foreign_lease_is_reported_lost_exactly_once(
    open_side: Open, server, probe, prefix
):
    """Given a registered key whose only lease belongs to a worker that died, when two live
    workers renew (and reap), then the dead holder is reported lost once, by one of them, and
    never again. Catches: reaping that misses registered keys, or reports a death twice."""
    dead = RedisLeases(redis.Redis(port=server.port), prefix, 0.3, "dead/1/abc")
    assert dead.execute([Acquire("k", "dead/1/abc t", 1)])[0].granted
    probe.zadd(registry(prefix), {"k": time.time()})
    sides = [open_side("a", lease_ttl=0.9), open_side("b", lease_ttl=0.9)]
    lost = ("dead/1/abc t",)
    wait_until(
        lambda: sum(s.seen("lost", "k", lost) for s in sides),
        10,
        what="the dead lease to be reaped",
    )
    for side in sides:
        side.wait_rounds(3)
    assert sum(s.seen("lost", "k", lost) for s in sides) == 1
    assert members(probe, Family.of(prefix, "k").holders) == set()


def test_redis_options_apply_to_every_connection(open_side: Open, server, probe, prefix):
    """Given throttle_redis_options with a client name, an ACL user's credentials and TCP
    keepalive settings, then every connection the transport opens carries the name, logs in as
    that user and has keepalive on with that idle time, and leases work. Catches: a transport
    that builds a connection of its own from the URL alone."""
    probe.acl_setuser(
        "limiter",
        enabled=True,
        passwords=["+s3cret"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    options = {
        "client_name": "throttle-contract",
        "username": "limiter",
        "password": "s3cret",
        "socket_keepalive": True,
        "socket_keepalive_options": {socket.TCP_KEEPIDLE: 17},
    }
    before = local_ports_to(server.port)  # this test's own clients
    side = open_side(options=options)
    clients = {c["addr"]: c for c in probe.client_list()}
    named = 0
    for sock in process_sockets_to(server.port):
        entry = clients.get("{}:{}".format(*sock.getsockname()))
        if sock.getsockname()[1] in before or entry is None or entry["name"] == "probe":
            continue
        named += 1
        assert (entry["name"], entry["user"]) == ("throttle-contract", "limiter"), entry
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 17
    assert named >= 2  # operations and grant messages
    a = side.acquire("k", "a", 1)
    side.wait_for("granted", "k", a)


def test_options_the_event_loop_cannot_honour_make_the_worker_use_threads(
    loop: Loop, server, probe, prefix, caplog
):
    """Given a worker with an event loop and an option its own connections cannot apply (the
    RESP3 protocol), when its transport is built, then it is the threaded one, the log says once
    which option made it so, and leases work through it. Catches: an option silently dropped on
    the event loop."""
    side = Side()
    with caplog.at_level(logging.WARNING, logger="celery_throttled"):
        opened = open_transport(
            "threads", loop, server.url, prefix, side, 30.0, {"protocol": 3}, hub=loop.hub
        )
    try:
        warnings = [r.getMessage() for r in caplog.records if "cannot apply" in r.getMessage()]
        assert len(warnings) == 1 and "protocol=3" in warnings[0]
        ready(side, probe, prefix)
        a = side.acquire("k", "a", 1)
        side.wait_for("granted", "k", a)
    finally:
        opened.close()
