"""Peak concurrency per key, recorded inside the worker, and the limiter's own view of a key.

Workers started by :class:`~celery_throttled.testing.WorkerFactory` record every run of a
throttled task in the test's Redis: Celery's ``task_prerun`` signal adds the task id to the set
of its key's runs and raises the key's peak if the set grew past it; an *ending* listener of
:mod:`celery_throttled.pool.release` removes it again as the body ends, before the process frees
the slot (``task_postrun`` comes after that, too late: another body may have started), and
``task_postrun`` removes it too for a run that never reached its body. Both run in the process
that runs the body (the pool child on prefork) inside the slot: after the admission, before the
release. So the recorded peak never exceeds what the cap allows unless bodies really overlapped,
and no line in the application's code is needed.

A pool process killed before ``task_postrun`` (a hard timeout, ``os._exit``) leaves its task id
in the set: read :meth:`ConcurrencyProbe.peak` for the cap, and do not expect
:meth:`ConcurrencyProbe.running` to fall back to 0 after such a death.

Keys (in the test's Redis, never in the limiter's key families)::

    {prefix}:probe:{key}:run    SET  task ids whose body is running now
    {prefix}:probe:{key}:peak   STR  the most bodies of that key ever running at once
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["ConcurrencyProbe"]

#: KEYS[1] - the key's running set; KEYS[2] - its peak. ARGV[1] - task id. Returns the new size.
ENTER = """
redis.call('SADD', KEYS[1], ARGV[1])
local n = redis.call('SCARD', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


def run_key(prefix: str, key: str) -> str:
    return f"{prefix}:probe:{key}:run"


def peak_key(prefix: str, key: str) -> str:
    return f"{prefix}:probe:{key}:peak"


class ConcurrencyProbe:
    """What the workers of one test recorded, per key, and what the limiter holds for it."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        import redis

        self.prefix = prefix
        self.client = redis.Redis.from_url(redis_url, decode_responses=True)

    def peak(self, key: str) -> int:
        """The most bodies of ``key`` that ever ran at once during this test."""
        return int(self.client.get(peak_key(self.prefix, key)) or 0)

    def running(self, key: str) -> int:
        """Bodies of ``key`` running now."""
        return int(self.client.scard(run_key(self.prefix, key)))

    def holders(self, key: str) -> int:
        """Slots of ``key`` the limiter has granted and not yet got back (its own state)."""
        from ..keys import Family

        return int(self.client.zcard(Family.of(self.prefix, key).holders))

    def waiting(self, key: str) -> int:
        """Runs of ``key`` waiting for a slot across the cluster (the limiter's own state)."""
        from ..keys import Family

        return int(self.client.zcard(Family.of(self.prefix, key).waiters))

    def reset(self, key: str) -> None:
        """Forget what was recorded for ``key`` (between two phases of one test)."""
        self.client.delete(run_key(self.prefix, key), peak_key(self.prefix, key))

    def wait_drained(self, key: str, timeout: float = 10.0) -> None:
        """Wait until the limiter holds no slot and no waiter for ``key`` (releases travel on
        their own, so a test that got every result may still see holders for a moment)."""
        deadline = time.monotonic() + timeout
        while self.holders(key) or self.waiting(key):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"key {key!r} still has {self.holders(key)} holder(s) and "
                    f"{self.waiting(key)} waiter(s) after {timeout}s"
                )
            time.sleep(0.02)

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"<ConcurrencyProbe prefix={self.prefix!r}>"


def record_runs(redis_url: str, prefix: str) -> None:
    """Connect the recording signal handlers in this (worker) process; see the module doc."""
    import os

    import redis
    from celery import signals

    from ..pool import release

    clients: dict[int, Any] = {}

    def client() -> Any:
        pid = os.getpid()  # a forked pool child needs its own connection
        if pid not in clients:
            clients.clear()
            conn = redis.Redis.from_url(redis_url)
            clients[pid] = (conn, conn.register_script(ENTER))
        return clients[pid]

    def key_of(sender: Any, args: Any, kwargs: Any) -> str | None:
        if getattr(sender, "throttle_limit", None) is None:
            return None
        try:
            return str(sender.throttle_key_for(args or (), kwargs or {}))
        except Exception:  # a bad key function: the task does not run
            return None

    def started(
        sender: Any = None, task_id: str = "", args: Any = None, kwargs: Any = None, **_: Any
    ) -> None:
        key = key_of(sender, args, kwargs)
        if key is not None:
            _, enter = client()
            enter([run_key(prefix, key), peak_key(prefix, key)], [task_id])

    def ended(
        sender: Any = None, task_id: str = "", args: Any = None, kwargs: Any = None, **_: Any
    ) -> None:
        key = key_of(sender, args, kwargs)
        if key is not None:
            conn, _ = client()
            conn.srem(run_key(prefix, key), task_id)

    def ending(task: Any, request: Any, outcome: str) -> None:
        ended(task, request.id, request.args, request.kwargs)

    signals.task_prerun.connect(started, weak=False)
    release.ending.insert(0, ending)  # before any other step that runs while the slot is held
    signals.task_postrun.connect(ended, weak=False)
