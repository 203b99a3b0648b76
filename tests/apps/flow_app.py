"""Throttled tasks with rates, families, priorities and max_pending, for the flow-control tests.

Imported by ``throttle_app`` (so the test workers register them) and by the tests themselves
(whose client apps submit them through ``apply_async``, where backpressure is checked). Nothing
here needs the environment at import time: the tasks find their probe Redis (``REDIS_URL``) and
prefix (``TEST_PREFIX``) when they run, and record themselves as ``throttle_app`` does, so
``tests/probes.py`` reads them.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import redis
from celery import shared_task

from celery_throttled import throttled_task


@functools.cache
def _probe() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


def tracked(group: str, label: str, duration: float, *also: str) -> str:
    """Count this run in ``group`` and ``also`` (current and peak), sleep, and log start and
    end times."""
    probe = _probe()
    prefix = os.environ.get("TEST_PREFIX", "t")
    bases = [f"{prefix}:probe:{g}" for g in (group, *also)]
    for base in bases:
        n = probe.incr(f"{base}:now")
        probe.rpush(f"{base}:started", f"{label} {time.time()}")
        probe.eval(
            "if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then "
            "redis.call('SET', KEYS[1], ARGV[1]) end",
            1,
            f"{base}:peak",
            n,
        )
    try:
        time.sleep(duration)
    finally:
        for base in bases:
            probe.decr(f"{base}:now")
            probe.rpush(f"{base}:finished", f"{label} {time.time()}")
    return label


# -- rates ----------------------------------------------------------------------------------
@throttled_task(rate="5/s", name="f.rated")
def rated(label: str, duration: float = 0.0) -> str:
    return tracked("rated", label, duration)


@throttled_task(rate="20/s", name="f.rated_fast")
def rated_fast(label: str) -> str:
    return tracked("rated_fast", label, 0)


@shared_task(rate_limit="50/s", name="f.celery_rate")
def celery_rate(label: str) -> str:
    """A plain task with Celery's own rate limit, beside the throttled ones."""
    return tracked("celery_rate", label, 0)


@throttled_task(limit=1, rate="4/s", name="f.rated_capped")
def rated_capped(label: str, duration: float = 0.0) -> str:
    return tracked("rated_capped", label, duration)


@throttled_task(rate="60/m", name="f.slow_rate")
def slow_rate(label: str) -> str:
    return tracked("slow_rate", label, 0)


@throttled_task(rate="2/s", key=lambda tenant, *a, **k: f"rate:{tenant}", name="f.rate_per_key")
def rate_per_key(tenant: str, label: str) -> str:
    return tracked(f"rate:{tenant}", label, 0)


# -- backpressure ---------------------------------------------------------------------------
@throttled_task(limit=2, max_pending=6, name="f.bounded")
def bounded(label: str, duration: float = 0.2) -> str:
    return tracked("bounded", label, duration)


# -- fair shares ----------------------------------------------------------------------------
def _tenant(tenant: str, *args: Any, **kwargs: Any) -> str:
    return f"tenant:{tenant}"


@throttled_task(limit=3, total=3, key=_tenant, name="f.tenant")
def tenant_task(tenant: str, label: str, duration: float = 0.2) -> str:
    return tracked("fair", f"{tenant}:{label}", duration, f"fair:{tenant}")


@throttled_task(limit=3, key="everyone", name="f.fifo")
def fifo_task(tenant: str, label: str, duration: float = 0.2) -> str:
    """The same work behind one shared key: first come first served."""
    return tracked("fair", f"{tenant}:{label}", duration)


@throttled_task(limit=1, total=2, family="reports", key=_tenant, name="f.report")
def report(tenant: str, label: str, duration: float = 0.1) -> str:
    return tracked("reports", f"report:{label}", duration, f"reports:{tenant}")


@throttled_task(limit=1, total=2, family="reports", key=_tenant, name="f.export")
def export(tenant: str, label: str, duration: float = 0.1) -> str:
    return tracked("reports", f"export:{label}", duration, f"reports:{tenant}")


def _slow_to_report(
    self: Any, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
) -> None:
    """Where the body ran, after its result is stored and before the worker's main process
    hears of the end: a second here delays that hearing by a second."""
    time.sleep(1.0)
    prefix = os.environ.get("TEST_PREFIX", "t")
    _probe().rpush(f"{prefix}:probe:family_handover:reported", f"{args[1]} {time.time()}")


@throttled_task(total=1, key=_tenant, name="f.family_handover", after_return=_slow_to_report)
def family_handover(tenant: str, label: str, duration: float = 0.05) -> str:
    """One slot for every tenant together; each tenant's own key has no cap (room to spare)."""
    return tracked("family_handover", label, duration)


def _weight(tenant: str, *args: Any, **kwargs: Any) -> int:
    return 2 if tenant == "vip" else 1


@throttled_task(total=1, key=_tenant, weight=_weight, name="f.weighted")
def weighted(tenant: str, label: str, hold: bool = False) -> str:
    """One slot for every tenant together, "vip" of weight 2; a holding run keeps the slot until
    the test pushes to ``<prefix>:probe:release``."""
    if hold:
        _probe().blpop(f"{os.environ.get('TEST_PREFIX', 't')}:probe:release", timeout=60)
    return tracked("weighted", f"{tenant}:{label}", 0)


# -- priority -------------------------------------------------------------------------------
@throttled_task(limit=1, key="prio", name="f.prio")
def prio(label: str, hold: bool = False) -> str:
    """Run ``label``; a holding run keeps the only slot until the test pushes to
    ``<prefix>:probe:release``."""
    if hold:
        _probe().blpop(f"{os.environ.get('TEST_PREFIX', 't')}:probe:release", timeout=60)
    return tracked("prio", label, 0)
