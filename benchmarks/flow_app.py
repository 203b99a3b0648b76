"""The tasks of ``bench_flow.py``: rates, fair shares, backpressure, and their comparisons.

Imported by ``bench_app`` (so the benchmark workers register them) and by ``bench_flow.py``
itself (whose producer submits through ``apply_async``, where backpressure is checked); nothing
here reads the environment at import time. Each body logs its span as ``bench_app`` does::

    {prefix}:probe:{group}:spans   "<start> <end>" (epoch seconds) of every run
    {prefix}:probe:{group}:peak    the highest number of bodies of the group at once
    {prefix}:probe:{group}:began   HASH task id -> start, for the groups that pass their id
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import types
from collections.abc import Iterator
from typing import Any

import redis
from celery import shared_task, signals

from celery_throttled import throttled_task

RATE = "50/s"
RATE_PER_SECOND = 50
FAIR_CAP = 6
BOUNDED_CAP = 4
MAX_PENDING = 100
NEVER_BINDS = 10_000


@functools.cache
def _probe() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


def _key(group: str, what: str) -> str:
    return f"{os.environ.get('BENCH_PREFIX', 'bench')}:probe:{group}:{what}"


_PEAK = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


@contextlib.contextmanager
def spanned(group: str, task_id: str | None = None) -> Iterator[None]:
    """Count the enclosed block in ``group``'s peak concurrency and log its span (and, given
    ``task_id``, when that task began)."""
    start = time.time()
    probe = _probe()
    probe.eval(_PEAK, 2, _key(group, "now"), _key(group, "peak"))
    try:
        yield
    finally:
        pipe = probe.pipeline(transaction=False)
        pipe.decr(_key(group, "now"))
        pipe.rpush(_key(group, "spans"), f"{start} {time.time()}")
        if task_id is not None:
            pipe.hset(_key(group, "began"), task_id, start)
        pipe.execute()


@shared_task(name="bench.flow_warm")
def flow_warm() -> None:
    """Open this pool process's probe connection before a row is timed."""
    _probe().ping()


# -- R1: a cluster-wide rate ----------------------------------------------------------------
@throttled_task(rate=RATE, bind=True, name="bench.flow_rated")
def flow_rated(self: Any, duration: float) -> None:
    with spanned("rated", self.request.id):
        time.sleep(duration)


@shared_task(rate_limit=RATE, name="bench.flow_celery_rate")
def flow_celery_rate(duration: float) -> None:
    """Celery's own rate_limit: a token bucket per worker."""
    with spanned("celery_rate"):
        time.sleep(duration)


@signals.worker_ready.connect
def kombu_timers_as_shipped(sender: Any, **kwargs: Any) -> None:
    """With ``BENCH_KOMBU_AS_SHIPPED=1``: the worker's event loop fires its timers as kombu
    ships it, without the gate's fix (``celery_throttled.worker.loop``), as on a worker of an
    app that has no throttled task: Celery's ``rate_limit`` as people get it without this
    package.

    A rate-limited request that finds its worker's bucket empty schedules a timer entry to try
    again (``Consumer._schedule_bucket_request``); every message that arrives meanwhile adds
    one more, and an entry that fires and still finds no token adds another, so entries pile
    up (tens per worker under a backlog). kombu's ``Hub.fire_timers`` fires at most 10 a turn
    and, when the 10th fired, returns its ``min_delay``, 1 s, as the poll timeout: the loop
    then sleeps a second with entries overdue, and each second one request (the bucket holds
    one token) goes to the pool.
    """
    hub = getattr(sender, "hub", None)
    if os.environ.get("BENCH_KOMBU_AS_SHIPPED") and hub is not None:
        hub.fire_timers = types.MethodType(type(hub).fire_timers, hub)


@shared_task(bind=True, max_retries=None, name="bench.flow_recipe_rate")
def flow_recipe_rate(self: Any, duration: float) -> None:
    """The hand-written recipe: a counter per second in Redis; over the rate, retry when the
    next second starts."""
    now = time.time()
    window = f"{os.environ.get('BENCH_PREFIX', 'bench')}:recipe:rate:{int(now)}"
    pipe = _probe().pipeline()
    pipe.incr(window)
    pipe.expire(window, 5)
    if pipe.execute()[0] > RATE_PER_SECOND:
        _probe().incr(f"{os.environ.get('BENCH_PREFIX', 'bench')}:recipe:rate:retries")
        raise self.retry(countdown=int(now) + 1 - now)
    with spanned("recipe_rate"):
        time.sleep(duration)


# -- F1: fair shares ------------------------------------------------------------------------
@throttled_task(
    limit=FAIR_CAP,
    total=FAIR_CAP,
    key=lambda tenant, *args, **kwargs: f"tenant:{tenant}",
    name="bench.flow_tenant",
)
def flow_tenant(tenant: str, duration: float) -> None:
    with spanned("fair"):
        time.sleep(duration)


@throttled_task(limit=FAIR_CAP, key="tenants", name="bench.flow_shared")
def flow_shared(tenant: str, duration: float) -> None:
    """The same work behind one shared key: first come first served."""
    with spanned("shared"):
        time.sleep(duration)


# -- B1: backpressure -----------------------------------------------------------------------
@throttled_task(limit=BOUNDED_CAP, max_pending=MAX_PENDING, name="bench.flow_bounded")
def flow_bounded(duration: float) -> None:
    with spanned("bounded"):
        time.sleep(duration)


# -- the admission step's cost ---------------------------------------------------------------
@throttled_task(
    limit=NEVER_BINDS, key=lambda i, *args, **kwargs: f"k{i % 10}", name="bench.flow_noop_cap"
)
def flow_noop_cap(i: int) -> None:
    """A no-op behind a cap alone, over the same ten keys as ``flow_noop``."""


@throttled_task(
    limit=NEVER_BINDS,
    total=NEVER_BINDS,
    rate="1000000/s",
    key=lambda i, *args, **kwargs: f"k{i % 10}",
    name="bench.flow_noop",
)
def flow_noop(i: int) -> None:
    """A no-op behind a cap, a family's total (over ten keys) and a rate, none of which bind."""
