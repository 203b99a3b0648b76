"""The tasks of ``bench_adaptive.py``, and the downstream they call.

Imported by ``bench_app`` (so the benchmark workers register them); nothing here reads the
environment at import time. The downstream lives in the benchmark's Redis, so both workers share
it::

    {prefix}:down:cap      how many calls it serves at once (the benchmark changes it mid-run)
    {prefix}:down:now      how many it serves now
    {prefix}:down:served   calls served; {prefix}:down:refused  calls refused ("overloaded")
    {prefix}:probe:{group}:spans   "<start> <end>" of every served call

A call beyond the capacity is refused at once and the task raises ``Overloaded``, which its
``RetryPolicy`` retries at once (through the broker, as an application would).
"""

from __future__ import annotations

import functools
import os
import time

import redis

from celery_throttled import Adaptive, Overloaded, RetryPolicy, throttled_task

#: how many calls each task may make before it gives up (never reached in a healthy run)
ATTEMPTS = 10_000
RETRY = RetryPolicy(on=(Overloaded,), max_attempts=ATTEMPTS, backoff=0)

_ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '1000000') then
  redis.call('DECR', KEYS[1])
  redis.call('INCR', KEYS[3])
  return 0
end
return 1
"""


@functools.cache
def _probe() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


def downstream_key(what: str) -> str:
    return f"{os.environ.get('BENCH_PREFIX', 'bench')}:down:{what}"


def call(group: str, duration: float) -> None:
    """One call to the downstream: served for ``duration`` s, or Overloaded at once."""
    probe = _probe()
    keys = (downstream_key("now"), downstream_key("cap"), downstream_key("refused"))
    if not probe.eval(_ENTER, 3, *keys):
        raise Overloaded("the downstream is at capacity")
    start = time.time()
    try:
        time.sleep(duration)
    finally:
        pipe = probe.pipeline(transaction=False)
        pipe.decr(downstream_key("now"))
        pipe.incr(downstream_key("served"))
        prefix = os.environ.get("BENCH_PREFIX", "bench")
        pipe.rpush(f"{prefix}:probe:{group}:spans", f"{start} {time.time()}")
        pipe.execute()


@throttled_task(limit=Adaptive(initial=16, min=1, max=64), retry=RETRY, name="bench.adaptive_call")
def adaptive_call(duration: float) -> None:
    call("adaptive", duration)


@throttled_task(limit=16, retry=RETRY, name="bench.fixed16_call")
def fixed16_call(duration: float) -> None:
    call("fixed16", duration)


@throttled_task(limit=4, retry=RETRY, name="bench.fixed4_call")
def fixed4_call(duration: float) -> None:
    call("fixed4", duration)


@throttled_task(limit=12, retry=RETRY, name="bench.fixed12_call")
def fixed12_call(duration: float) -> None:
    call("fixed12", duration)
