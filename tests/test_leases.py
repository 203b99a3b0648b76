"""The Lua lease scripts, driven directly against a real Redis."""

from __future__ import annotations

import json
import time

import pytest
import redis

from celery_throttled.keys import grant_channel
from celery_throttled.transport.leases import Acquire, Outcome, RedisLeases, Release, Renew

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
