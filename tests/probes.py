"""Read what the test tasks recorded about themselves in Redis (see tests/apps/throttle_app.py)."""

from __future__ import annotations

import redis
from redis.cluster import RedisCluster

from celery_throttled.keys import Family


def peak(probe: redis.Redis, prefix: str, group: str) -> int:
    return int(probe.get(f"{prefix}:probe:{group}:peak") or 0)


def _events(probe: redis.Redis, prefix: str, group: str, kind: str) -> list[tuple[str, float]]:
    out = []
    for raw in probe.lrange(f"{prefix}:probe:{group}:{kind}", 0, -1):
        label, stamp = str(raw).rsplit(" ", 1)
        out.append((label, float(stamp)))
    return out


def started(probe: redis.Redis, prefix: str, group: str) -> list[tuple[str, float]]:
    return _events(probe, prefix, group, "started")


def finished(probe: redis.Redis, prefix: str, group: str) -> list[tuple[str, float]]:
    return _events(probe, prefix, group, "finished")


def reported(probe: redis.Redis, prefix: str, group: str) -> list[tuple[str, float]]:
    """When each run's process finished what it does after the body (``after_return``)."""
    return _events(probe, prefix, group, "reported")


def leases(probe: redis.Redis | RedisCluster, prefix: str, key: str) -> dict[str, int]:
    """Holders and waiters the limiter has in Redis for ``key``."""
    family = Family.of(prefix, key)
    holders, waiters = probe.zcard(family.holders), probe.zcard(family.waiters)
    return {"holders": int(holders), "waiters": int(waiters)}


def wait_drained(probe: redis.Redis, prefix: str, key: str, timeout: float = 10.0) -> None:
    """Wait until ``key`` has no holder, no waiter and no waiter's park mark left (releases are
    asynchronous; a mark left behind would be a leak in the parked hash)."""
    from .conftest import wait_until

    marks = Family.of(prefix, key).parked

    def drained() -> bool:
        empty = leases(probe, prefix, key) == {"holders": 0, "waiters": 0}
        return empty and not probe.hlen(marks)

    wait_until(
        drained,
        timeout,
        what=f"key {key!r} to drain, now {leases(probe, prefix, key)}, "
        f"{probe.hlen(marks)} park mark(s)",
    )


def unacknowledged(probe: redis.Redis, task_ids: list[str]) -> set[str]:
    """Which of ``task_ids`` have a message delivered to a worker and not yet acknowledged
    (kombu's Redis transport keeps those in the ``unacked`` hash until the ack)."""
    pending = set()
    for raw in probe.hvals("unacked"):
        text = str(raw)
        pending |= {task_id for task_id in task_ids if task_id in text}
    return pending


def queued(probe: redis.Redis, queue: str, task_ids: list[str]) -> set[str]:
    """Which of ``task_ids`` wait in the broker's ``queue`` list."""
    messages = [str(raw) for raw in probe.lrange(queue, 0, -1)]
    return {task_id for task_id in task_ids if any(task_id in m for m in messages)}


def span_peak(spans: list[tuple[float, float]]) -> int:
    """The most spans (start, end) that overlap at any moment; an end before a start on a tie."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = highest = 0
    for _, step in edges:
        running += step
        highest = max(highest, running)
    return highest


def script_calls(limiter: redis.Redis) -> int:
    """Lease script calls the limiter's Redis ran so far (by SHA, or by source)."""
    stats = limiter.info("commandstats")
    names = ("evalsha", "eval")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names)
