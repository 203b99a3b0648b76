"""The admission rules in the lease scripts (rates, wake-ups, families, priorities, pending),
driven directly against a real Redis, and their parsing at decoration."""

from __future__ import annotations

import pytest
import redis

from celery_throttled import ConfigurationError, throttled_task
from celery_throttled.admission import Admission, Rate
from celery_throttled.keys import family_key
from celery_throttled.transport.leases import Acquire, Outcome, RedisLeases, Release, Renew

from .conftest import wait_until

TEN_PER_SECOND = Admission(rate=Rate(10.0))  # one token every 100 ms


def leases(redis_url: str, prefix: str, worker: str = "w", **kw) -> RedisLeases:
    return RedisLeases(redis.Redis.from_url(redis_url), prefix, lease_ttl=30, worker=worker, **kw)


def acquire(
    store: RedisLeases,
    holder: str,
    cap: int = 5,
    key: str = "k",
    admission: Admission | None = TEN_PER_SECOND,
    rank: int = 0,
) -> Outcome:
    return store.execute([Acquire(key, holder, cap, admission, rank)])[0]


# -- rates ------------------------------------------------------------------------------------
def test_a_rate_admits_one_per_interval_and_says_when_the_next_token_is_due(redis_url, prefix):
    """Given a key capped at 5 with a rate of 10/s (burst 1),
    When three holders ask at once,
    Then the first is granted and the others wait without holding a slot, and the reply says
    when the next token is due (about one interval ahead, in Redis time): an admission that
    ignored the rate, or a waiter holding a slot while it waits for a token, fails here."""
    store = leases(redis_url, prefix)
    first = acquire(store, "w a")
    assert first.granted == ["w a"] and first.wake_at is None
    second = acquire(store, "w b")
    assert second.granted == []
    assert second.wake_at is not None and second.clock is not None
    assert 0 < second.wake_at - second.clock <= 100
    assert acquire(store, "w c").granted == []
    client = redis.Redis.from_url(redis_url)
    family = store.family("k")
    assert client.zcard(family.holders) == 1 and client.zcard(family.waiters) == 2
    # When the token is due, a renewal of the key (a wake-up) grants the oldest waiter only
    poke = Renew("k", 5, admission=TEN_PER_SECOND)
    granted = wait_until(
        lambda: store.execute([poke])[0].granted, 2, interval=0.01, what="the second token"
    )
    assert granted == ["w b"]
    assert client.zcard(family.holders) == 2 and client.zcard(family.waiters) == 1


def test_a_waiter_blocked_by_the_cap_is_not_woken_by_time(redis_url, prefix):
    """Given cap 1 and a rate, one holder running and one waiting,
    When the waiter is blocked by the cap (whatever the rate),
    Then no wake-up is asked for (only a release can help it); and when the release comes
    before the next token is due, the releaser is told when to wake instead: a wake-up loop
    while the cap is full, or a lost wake-up after the release, fails here."""
    store = leases(redis_url, prefix)
    assert acquire(store, "w a", cap=1).granted == ["w a"]
    blocked = acquire(store, "w b", cap=1)
    assert blocked.granted == [] and blocked.wake_at is None
    released = store.execute([Release("k", "w a", 1, "done", admission=TEN_PER_SECOND)])[0]
    assert released.granted == []
    assert released.wake_at is not None and released.clock is not None
    assert 0 < released.wake_at - released.clock <= 100


def test_burst_lets_that_many_start_at_once(redis_url, prefix):
    """Given rate 10/s with burst 3 on an idle key, When five ask at once, Then three start
    and two wait: a burst ignored (1 start) or unbounded (5) fails here."""
    store = leases(redis_url, prefix)
    bursty = Admission(rate=Rate(10.0, burst=3))
    assert [bool(acquire(store, f"w {i}", admission=bursty).granted) for i in range(5)] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_only_the_first_worker_to_learn_a_due_time_is_told_to_wake(redis_url, prefix):
    """Given two workers with waiters blocked by the same next token,
    When both learn of it, Then only the first is told to wake (one poke per token, not one per
    worker), and that worker is told again if it asks early: a poke lost for good, or one per
    worker, fails here."""
    x, y = leases(redis_url, prefix, "x"), leases(redis_url, prefix, "y")
    assert acquire(x, "x a").granted == ["x a"]
    told_x = acquire(x, "x b")
    told_y = acquire(y, "y c")
    assert told_x.wake_at is not None and told_y.wake_at is None
    again = x.execute([Renew("k", 5, admission=TEN_PER_SECOND)])[0]
    assert again.granted == [] or again.granted == ["x b"]
    if not again.granted:  # asked before the token was due: told the same time again
        assert again.wake_at == told_x.wake_at


def test_a_live_rate_override_applies_to_the_next_grant(redis_url, prefix):
    """Given a key at 10/s, When an operator overrides its rate to 1/h, Then the next waiter's
    token is an hour away: an override not read by the scripts fails here."""
    store = leases(redis_url, prefix)
    client = redis.Redis.from_url(redis_url)
    client.hset(store.family("k").meta, "rate_override", Rate(1 / 3600).encode())
    assert acquire(store, "w a").granted == ["w a"]
    waiting = acquire(store, "w b")
    assert waiting.wake_at is not None and waiting.clock is not None
    assert waiting.wake_at - waiting.clock > 3_000_000


# -- decoration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate": "fast"}, "rate must be a positive number per second or a string like"),
        ({"rate": "0/s"}, "got '0/s'"),
        ({"rate": 0}, "got 0"),
        ({"rate": "-3/m"}, "got '-3/m'"),
        ({"rate": "20/d"}, "got '20/d'"),
        ({"rate": True}, "got True"),
        ({"rate": "5/s", "burst": 0}, "burst must be a positive int, got 0"),
        ({"burst": 3}, "burst needs a rate"),
    ],
)
def test_bad_rates_are_refused_at_decoration_naming_task_and_value(options, message):
    """Given a bad rate, When the task is decorated, Then ConfigurationError names the task and
    the value: a bad rate accepted (and found only in a worker) fails here."""
    with pytest.raises(ConfigurationError, match=message) as info:

        @throttled_task(name="api.bad_rate", **options)
        def task() -> None: ...

    assert "api.bad_rate" in str(info.value)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("20/s", 20.0), ("120/m", 2.0), ("36/h", 0.01), ("20", 20.0), (2.5, 2.5), (" 7 / s", 7.0)],
)
def test_rates_parse_in_every_spelling(text, per_second):
    assert Rate.parse(text).per_second == pytest.approx(per_second)


def test_rate_encodes_and_reads_back():
    rate = Rate.parse("50/s", burst=4)
    assert Rate.decode(rate.encode()) == rate and str(rate) == "50/s"
    assert str(Rate.parse("90/m")) == "1.5/s" and str(Rate.parse("30/m")) == "30/m"


# -- families -----------------------------------------------------------------------------------
def in_family(key: str) -> str:
    return family_key("fam", key)


FAMILY_OF_TWO = Admission(family="fam", total=2)


def fam_acquire(store: RedisLeases, key: str, holder: str, cap: int = 2) -> bool:
    return holder in acquire(store, holder, cap, in_family(key), FAMILY_OF_TWO).granted


def fam_release(store: RedisLeases, key: str, holder: str, cap: int = 2) -> Outcome:
    return store.execute([Release(in_family(key), holder, cap, "done", admission=FAMILY_OF_TWO)])[0]


def test_a_freed_slot_goes_to_the_key_served_least_recently(redis_url, prefix):
    """Given a family of total 2 whose key A took both slots and queued three more, then keys B
    and C queued one each,
    When slots free one by one,
    Then they go to B, then C (never served), then A again, first come first served within A:
    a grant to the oldest waiter overall (A's backlog first) fails here."""
    store = leases(redis_url, prefix)
    assert [fam_acquire(store, "A", f"w a{i}") for i in range(5)] == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert fam_acquire(store, "B", "w b0") is False
    assert fam_acquire(store, "C", "w c0") is False
    served = []
    for key, holder in [("A", "w a0"), ("A", "w a1"), ("B", "w b0"), ("C", "w c0"), ("A", "w a2")]:
        # a grant to another key than the released one is published, not returned
        fam_release(store, key, holder)
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        holders = set()
        for k in "ABC":
            holders |= set(client.zrange(store.family(in_family(k)).holders, 0, -1))
        served.append(sorted(holders))
    assert served == [
        ["w a1", "w b0"],
        ["w b0", "w c0"],
        ["w a2", "w c0"],
        ["w a2", "w a3"],
        ["w a3", "w a4"],
    ]


def test_a_key_just_served_goes_behind_every_other_waiting_key(redis_url, prefix):
    """Given a family of total 1 whose key A holds the slot with a backlog, and key B, served
    once before, queueing again behind it,
    When slots free one by one,
    Then A and B alternate (a key goes to the back of the round robin each time it is served):
    a key that keeps its place when served (its backlog served before a key that came back,
    first come first served across keys) fails here."""
    store = leases(redis_url, prefix)
    one = Admission(family="fam", total=1)

    def ask(key: str, holder: str) -> bool:
        return holder in acquire(store, holder, 2, in_family(key), one).granted

    def free(key: str, holder: str) -> None:
        store.execute([Release(in_family(key), holder, 2, "done", admission=one)])

    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def holding() -> list[str]:
        return [
            str(h) for k in "AB" for h in client.zrange(store.family(in_family(k)).holders, 0, -1)
        ]

    assert [ask("A", f"w a{i}") for i in range(4)] == [True, False, False, False]
    assert ask("B", "w b0") is False
    free("A", "w a0")
    assert holding() == ["w b0"]  # never served before: B first
    assert ask("B", "w b1") is False  # B queues again, behind A's backlog in time
    served = []
    for key, holder in [("B", "w b0"), ("A", "w a1"), ("B", "w b1"), ("A", "w a2")]:
        free(key, holder)
        served += holding()
    assert served == ["w a1", "w b1", "w a2", "w a3"]


def test_a_key_of_weight_three_is_served_three_times_in_a_row(redis_url, prefix):
    """Given a family of total 1, key A of weight 3 and key B of weight 1, both with a backlog
    behind a holder of the slot,
    When slots free one by one, Then they go A, A, A, B, A, B (neither served before: A first
    by name; each key first come first served): a weight ignored (A and B alternating) fails
    here."""
    store = leases(redis_url, prefix)
    heavy = Admission(family="fam", total=1, weight=3)
    light = Admission(family="fam", total=1)
    rules = {"A": heavy, "B": light, "Z": light}

    def ask(key: str, holder: str) -> bool:
        return holder in acquire(store, holder, 5, in_family(key), rules[key]).granted

    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def holding() -> list[str]:
        return [
            str(h) for k in "ABZ" for h in client.zrange(store.family(in_family(k)).holders, 0, -1)
        ]

    assert ask("Z", "w z0") is True
    assert [ask("A", f"w a{i}") for i in range(4)] == [False] * 4
    assert [ask("B", f"w b{i}") for i in range(2)] == [False] * 2
    served, last = [], ("Z", "w z0")
    for _ in range(6):
        store.execute([Release(in_family(last[0]), last[1], 5, "done", admission=rules[last[0]])])
        (holder,) = holding()
        served.append(holder)
        last = (holder[2].upper(), holder)
    assert served == ["w a0", "w a1", "w a2", "w b0", "w a3", "w b1"]


def test_each_key_keeps_its_own_cap_within_the_total(redis_url, prefix):
    """Given a family of total 2 and keys capped at 1,
    When key A queues three and key B one, Then A never holds two slots even with the family
    below its total, and B gets the second: a total without per-key caps fails here."""
    store = leases(redis_url, prefix)
    assert [fam_acquire(store, "A", f"w a{i}", cap=1) for i in range(3)] == [True, False, False]
    assert fam_acquire(store, "B", "w b0", cap=1) is True
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.hget(store.family(in_family("A")).total, "running") == "2"
    fam_release(store, "B", "w b0", cap=1)
    assert client.zcard(store.family(in_family("A")).holders) == 1  # A still at its own cap
    assert client.hget(store.family(in_family("A")).total, "running") == "1"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"limit": 4, "total": 3}, r"total \(3\) must be at least limit \(4\)"),
        ({"limit": 1, "total": 0}, "total must be a positive int, got 0"),
        ({"limit": 1, "family": "f"}, "family='f' needs total"),
        ({"limit": 1, "total": 2, "family": ""}, "family must be a non-empty str"),
    ],
)
def test_bad_totals_are_refused_at_decoration(options, message):
    with pytest.raises(ConfigurationError, match=message) as info:

        @throttled_task(name="api.bad_total", **options)
        def task() -> None: ...

    assert "api.bad_total" in str(info.value)


def test_tasks_sharing_a_family_must_share_its_total():
    @throttled_task(limit=1, total=3, family="api-fam", name="api.fam_one")
    def one() -> None: ...

    with pytest.raises(ConfigurationError, match=r"family 'api-fam' already has total 3"):

        @throttled_task(limit=1, total=4, family="api-fam", name="api.fam_two")
        def two() -> None: ...
