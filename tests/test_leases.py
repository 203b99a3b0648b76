"""The Lua lease scripts, driven directly against a real Redis."""

from __future__ import annotations

import json
import time

import pytest
import redis

from celery_throttled.admission import Admission, Rate
from celery_throttled.keys import Family, grant_channel
from celery_throttled.transport.leases import (
    Acquire,
    Outcome,
    RedisLeases,
    Release,
    Renew,
    lease_spec,
)

from .conftest import wait_until


@pytest.fixture
def store(redis_url: str, prefix: str) -> RedisLeases:
    return RedisLeases(redis.Redis.from_url(redis_url), prefix, lease_ttl=30, worker="w")


def acquire(store: RedisLeases, holder: str, cap: int = 2, key: str = "k") -> bool:
    return holder in store.execute([Acquire(key, holder, cap)])[0].granted


def release(store: RedisLeases, holder: str, cap: int = 2, key: str = "k") -> Outcome:
    return store.execute([Release(key, holder, cap)])[0]


def test_grants_up_to_the_cap_then_queues_in_order(store):
    # Given a cap of 2, when four holders ask
    assert [acquire(store, f"w a{i}") for i in range(4)] == [True, True, False, False]
    # Then releasing one slot hands it to the oldest waiter, not to a newcomer
    assert acquire(store, "w late") is False
    assert release(store, "w a0").granted == ["w a2"]  # returned to its own worker
    assert acquire(store, "w late") is False
    assert acquire(store, "w a2") is True  # acquire is idempotent
    assert acquire(store, "w a3") is False


def test_release_is_idempotent_and_frees_exactly_one_slot(store):
    acquire(store, "w a"), acquire(store, "w b"), acquire(store, "w c")
    assert release(store, "w a").known is True
    assert release(store, "w a").known is False
    # c got a's slot; a second release of a granted nothing more
    assert acquire(store, "w c") is True
    assert acquire(store, "w d") is False


def test_a_release_publishes_the_grant_to_another_workers_waiter(redis_url, prefix):
    """Given a waiter of another worker, when a release frees the slot, then the grant is not
    returned to the releasing worker but published on the waiter's worker channel. Catches: a
    grant returned to the caller whatever worker waits, or published on the wrong channel."""
    client = redis.Redis.from_url(redis_url)
    store = RedisLeases(client, prefix, lease_ttl=30, worker="mine")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    channel = grant_channel(prefix, "other")
    pubsub.subscribe(channel)

    def subscribed() -> bool:
        pubsub.get_message(timeout=0.01)  # reads the confirmation, so the subscription is live
        return dict(client.pubsub_numsub(channel)).get(channel.encode()) == 1

    wait_until(subscribed, 5, what="the subscription to be registered by Redis")
    acquire(store, "mine a", cap=1)
    acquire(store, "other b", cap=1)
    assert release(store, "mine a", cap=1).granted == []

    def message():
        m = pubsub.get_message(timeout=0.1)
        return m and json.loads(m["data"])

    assert wait_until(message, 5) == ["k", "other b"]


def test_an_acquire_marks_a_waiter_parked_and_its_entry_goes_as_it_leaves_the_line(
    redis_url, prefix
):
    """Given acquires that carry a park nonce, then a holder granted at once is not marked, a
    waiter is (its grant pushes "go" onto the park list of that nonce and takes the mark away),
    and the mark of a waiter that leaves the line ungranted goes: released, or reaped with its
    dead worker. Catches: a parked waiter's first park that still needs park.lua (no mark, no
    "go"), and marks left behind in the parked hash by waiters that never got a slot."""
    client = redis.Redis.from_url(redis_url)
    store = RedisLeases(client, prefix, lease_ttl=30, worker="w")
    family = store.family("k")

    def ask(holder: str, nonce: str) -> bool:
        return holder in store.execute([Acquire("k", holder, 1, park=nonce)])[0].granted

    assert ask("w run", "n0") is True
    assert ask("w next", "n1") is False
    assert ask("w gone", "n2") is False
    assert client.hgetall(family.parked) == {b"w next": b"n1", b"w gone": b"n2"}
    assert release(store, "w run", cap=1).granted == ["w next"]
    assert client.lrange(family.park_list("w next", "n1"), 0, -1) == [b"go"]
    assert client.hgetall(family.parked) == {b"w gone": b"n2"}
    release(store, "w gone", cap=1)
    assert client.hlen(family.parked) == 0
    # a dead worker's waiter: reaped once its place in line expires
    short = RedisLeases(client, prefix, lease_ttl=0.2, worker="dead")
    assert "dead d" not in short.execute([Acquire("k", "dead d", 1, park="n3")])[0].granted
    assert client.hget(family.parked, "dead d") == b"n3"
    time.sleep(0.3)  # let its place in line expire: the point is the passage of time
    release(store, "w next", cap=1)
    assert client.hlen(family.parked) == 0


def test_expired_leases_and_waiters_are_reaped(redis_url, prefix):
    store = RedisLeases(redis.Redis.from_url(redis_url), prefix, lease_ttl=0.2, worker="w")
    assert acquire(store, "dead a", cap=1) is True
    assert acquire(store, "dead b", cap=1) is False  # a waiter that will stop renewing
    time.sleep(0.3)  # let both expire: the point of the test is the passage of time
    assert acquire(store, "w c", cap=1) is True


def test_renew_extends_restores_and_reports_missed_grants(store, redis_url, prefix):
    client = redis.Redis.from_url(redis_url)
    acquire(store, "w run", cap=1)
    acquire(store, "w wait", cap=1)
    # When Redis loses the family (a restart without persistence)
    for key in store.family("k").all():
        client.delete(key)
    # Then a renewal puts the running lease back and the waiter back in line
    (result,) = store.execute([Renew("k", 1, running=["w run"], waiting=["w wait"])])
    assert result == Outcome("k", granted=[], restored=["w run"])
    assert acquire(store, "w newcomer", cap=1) is False
    # And a waiter granted while its worker missed the message is reported by the next renewal
    other = RedisLeases(client, prefix, lease_ttl=30, worker="x")
    assert other.execute([Release("k", "w run", 1)])[0].granted == []
    (result,) = store.execute([Renew("k", 1, running=[], waiting=["w wait"])])
    assert result.granted == ["w wait"]


def test_live_override_caps_below_the_declared_limit(store, redis_url):
    client = redis.Redis.from_url(redis_url)
    client.hset(store.family("k").meta, "override", 1)
    assert [acquire(store, f"w {i}", cap=5) for i in range(3)] == [True, False, False]


def test_a_release_as_the_body_ends_frees_once_and_no_renewal_brings_it_back(
    store, redis_url, prefix
):
    """Given a slot released by its pool process as the body ended (``ending``), when the
    worker's main process then renews it as still running and releases it too, then the slot
    stays freed exactly once: the renewal neither extends nor restores it, the second release
    frees nothing more. Catches: a renewal that revives an ended lease (the cap exceeded by
    one), or a second release that frees someone else's slot."""
    client = redis.Redis.from_url(redis_url)
    pool = RedisLeases(client, prefix, lease_ttl=30, worker="")
    holders = store.family("k").holders
    assert acquire(store, "w run", cap=1) is True
    assert acquire(store, "w next", cap=1) is False
    # When the pool process releases as the body ends: the waiter is granted at once
    (freed,) = pool.execute([Release("k", "w run", 0, "done", spec="1", ending=True)])
    assert freed.known is True
    assert client.zrange(holders, 0, -1) == [b"w next"]
    # Then a renewal still counting it as running puts nothing back
    (renewed,) = store.execute([Renew("k", 1, running=["w run", "w next"])])
    assert renewed.restored == []
    assert client.zrange(holders, 0, -1) == [b"w next"]
    # And the main process's release is a no-op: counted once, no slot freed
    assert release(store, "w run", cap=1).known is False
    assert client.zrange(holders, 0, -1) == [b"w next"]
    assert acquire(store, "w late", cap=1) is False
    assert client.hget(store.family("k").meta, "done") == b"1"
    # And the record of the ended lease expires with it
    assert 0 < client.pttl(store.family("k").ended) <= 30_000


def test_a_holder_that_ended_is_renewed_again_once_it_acquires_anew(store, redis_url, prefix):
    """Given a holder whose slot was released as its body ended, when the same holder (a retry
    of the task, same worker) acquires again, then renewals extend its new lease. Catches: the
    ended mark outliving its run, leaving the retry's lease to expire while it runs."""
    client = redis.Redis.from_url(redis_url)
    pool = RedisLeases(client, prefix, lease_ttl=30, worker="")
    assert acquire(store, "w again", cap=1) is True
    pool.execute([Release("k", "w again", 0, "retried", spec="1", ending=True)])
    assert acquire(store, "w again", cap=1) is True
    client.delete(store.family("k").holders)  # Redis lost the lease
    (renewed,) = store.execute([Renew("k", 1, running=["w again"])])
    assert renewed.restored == ["w again"]


def test_a_release_as_the_body_ends_publishes_every_grant(redis_url, prefix):
    """Given a waiter of the worker whose pool process releases, when that process frees the
    slot, then the grant is published on the worker's channel (the pool process is no worker:
    nothing is returned to it). Catches: a grant returned to a process that cannot admit it."""
    client = redis.Redis.from_url(redis_url)
    store = RedisLeases(client, prefix, lease_ttl=30, worker="w")
    pool = RedisLeases(client, prefix, lease_ttl=30, worker="")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    channel = grant_channel(prefix, "w")
    pubsub.subscribe(channel)

    def subscribed() -> bool:
        pubsub.get_message(timeout=0.01)
        return dict(client.pubsub_numsub(channel)).get(channel.encode()) == 1

    wait_until(subscribed, 5, what="the subscription to be registered by Redis")
    acquire(store, "w a", cap=1)
    acquire(store, "w b", cap=1)
    (freed,) = pool.execute([Release("k", "w a", 0, "done", spec="1", ending=True)])
    assert freed.granted == []

    def message():
        m = pubsub.get_message(timeout=0.1)
        return m and json.loads(m["data"])

    assert wait_until(message, 5) == ["k", "w b"]


def test_a_release_as_the_body_ends_leaves_expired_leases_to_a_worker_to_report(redis_url, prefix):
    """Given the expired lease of a dead worker beside a live one and a waiter, when a pool
    process frees the live slot as its body ends, then it reaps nothing (a pool process cannot
    report the dead holder's task as lost), the waiter is granted within the cap, and the next
    script a worker runs on the key reaps the expired lease and reports it. Catches: expired
    leases reaped by a pool process's release, whose tasks then never get their worker_lost
    envelope."""
    client = redis.Redis.from_url(redis_url)
    dead = RedisLeases(client, prefix, lease_ttl=0.2, worker="dead")
    store = RedisLeases(client, prefix, lease_ttl=30, worker="w")
    pool = RedisLeases(client, prefix, lease_ttl=30, worker="")
    assert acquire(dead, "dead x", cap=2) is True
    assert acquire(store, "w a", cap=2) is True
    assert acquire(store, "w b", cap=2) is False
    time.sleep(0.3)  # let the dead lease expire: the point of the test is the passage of time
    (freed,) = pool.execute([Release("k", "w a", 0, "done", spec="2", ending=True)])
    assert freed.reaped == []
    holders = client.zrange(Family.of(prefix, "k").holders, 0, -1)
    assert sorted(holders) == [b"dead x", b"w b"]  # granted beside the lease still counted
    (later,) = store.execute([Acquire("k", "w c", 2)])
    assert later.reaped == ["dead x"]
    assert later.granted == ["w c"]


def test_a_wake_up_found_by_a_release_as_the_body_ends_goes_to_the_holders_worker(
    redis_url, prefix
):
    """Given a key at 1 start per second whose next waiter is blocked only by the rate, when the
    pool process frees the running slot, then the wake-up (when the next token is due) is
    published to the holder's worker, which alone can wait for it. Catches: a wake-up claimed
    by nobody (the waiter stalls until a renewal round), or claimed for the pool process."""
    client = redis.Redis.from_url(redis_url)
    store = RedisLeases(client, prefix, lease_ttl=30, worker="w")
    pool = RedisLeases(client, prefix, lease_ttl=30, worker="")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    channel = grant_channel(prefix, "w")
    pubsub.subscribe(channel)

    def subscribed() -> bool:
        pubsub.get_message(timeout=0.01)
        return dict(client.pubsub_numsub(channel)).get(channel.encode()) == 1

    wait_until(subscribed, 5, what="the subscription to be registered by Redis")
    rated = Admission(rate=Rate(1.0))  # one start per second, no burst
    assert store.execute([Acquire("k", "w run", 1, rated)])[0].granted == ["w run"]
    assert store.execute([Acquire("k", "w next", 1, rated)])[0].granted == []
    spec = lease_spec("k", 1, rated)
    pool.execute([Release("k", "w run", 0, "done", spec=spec, ending=True)])

    def message():
        m = pubsub.get_message(timeout=0.1)
        return m and json.loads(m["data"])

    wake = wait_until(message, 5)
    assert wake["wake"] == "k" and wake["at"] > wake["now"]
