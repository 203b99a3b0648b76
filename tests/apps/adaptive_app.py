"""Tasks with adaptive caps, and a fragile downstream for them, for tests/test_adaptive.py.

Imported by ``throttle_app`` (so the test workers register them). The downstream lives in the
probe Redis: ``{prefix}:down:<name>:cap`` is how many calls it serves at once (changeable while
it runs), ``:now`` how many it serves, ``:503`` how many it refused. Nothing here needs the
environment at import time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from celery_throttled import Adaptive, Overloaded, RetryPolicy, SlowDown, throttled_task

from .flow_app import _probe, tracked

_ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '1000000') then
  redis.call('DECR', KEYS[1])
  redis.call('INCR', KEYS[3])
  return 0
end
return 1
"""


def call_downstream(name: str, duration: float) -> None:
    """One call to the downstream ``name``: served for ``duration`` seconds, or Overloaded at
    once when it already serves its capacity."""
    probe = _probe()
    base = f"{os.environ.get('TEST_PREFIX', 't')}:down:{name}"
    if not probe.eval(_ENTER, 3, f"{base}:now", f"{base}:cap", f"{base}:503"):
        raise Overloaded(f"downstream {name!r} is at capacity")
    try:
        time.sleep(duration)
    finally:
        probe.decr(f"{base}:now")


@contextmanager
def counted(group: str, label: str) -> Iterator[None]:
    """Count a whole body in ``group`` (current and peak, start and end times), as
    ``flow_app.tracked`` does around its sleep."""
    probe = _probe()
    base = f"{os.environ.get('TEST_PREFIX', 't')}:probe:{group}"
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
        yield
    finally:
        probe.decr(f"{base}:now")
        probe.rpush(f"{base}:finished", f"{label} {time.time()}")


@throttled_task(
    limit=Adaptive(initial=8, min=1, max=12),
    retry=RetryPolicy(on=(Overloaded,), max_attempts=200, backoff=0.02, backoff_max=0.2),
    name="a.fragile",
)
def fragile(label: str, duration: float = 0.05) -> str:
    with counted("fragile", label):
        call_downstream("fragile", duration)
    return label


@throttled_task(
    limit=Adaptive(initial=3, min=2, max=4),
    key=lambda mode, label: f"bounds:{mode}",
    name="a.bounded",
)
def bounded(mode: str, label: str) -> str:
    with counted(f"bounded:{mode}", label):
        time.sleep(0.05)
        if mode == "refused":
            raise Overloaded("always")
    return label


@throttled_task(limit=Adaptive(initial=4, min=1, max=4), name="a.polite")
def polite(label: str, retry_after: float = 0.0) -> str:
    with counted("polite", label):
        pass
    if retry_after:
        raise SlowDown(retry_after=retry_after)
    return label


@throttled_task(limit=Adaptive(initial=8, min=1, max=16), name="a.pinned")
def pinned(label: str, duration: float = 0.2) -> str:
    return tracked("pinned", label, duration)


_QUEUE_IN = "return redis.call('INCR', KEYS[1])"


@throttled_task(limit=Adaptive(initial=4, min=1, max=16), name="a.queueing")
def queueing(label: str) -> str:
    """A downstream that never refuses but queues: a call takes 50 ms while 3 or fewer are
    inside, and proportionally longer beyond (6 inside: 100 ms each)."""
    probe = _probe()
    base = f"{os.environ.get('TEST_PREFIX', 't')}:down:queueing"
    with counted("queueing", label):
        inside = int(probe.eval(_QUEUE_IN, 1, f"{base}:now"))
        try:
            time.sleep(0.05 * max(1.0, inside / 3))
        finally:
            probe.decr(f"{base}:now")
    return label
