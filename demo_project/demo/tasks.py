"""A downstream that allows five concurrent callers, and a task that calls it under a cap of five.

The "downstream" here is a pair of Redis counters (in flight now, and the peak seen), so the
demo can show the cap from the downstream's side of the fence.
"""

from __future__ import annotations

import time

import redis

from celery_throttled import throttled_task

from .celery import REDIS_URL, app

DOWNSTREAM_CAPACITY = 5
_downstream = redis.Redis.from_url(REDIS_URL)
_enter = _downstream.register_script(
    """
    local n = redis.call('INCR', KEYS[1])
    if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
    return n
    """
)


def call_downstream(prefix: str, seconds: float) -> int:
    """Pretend to call the fragile service; return how many callers were inside with us."""
    inside = int(_enter([f"{prefix}:inflight", f"{prefix}:peak"]))
    try:
        time.sleep(seconds)
    finally:
        _downstream.decr(f"{prefix}:inflight")
    return inside


@throttled_task(limit=DOWNSTREAM_CAPACITY, key="payments-api", name="demo.charge")
def charge(order_id: int, seconds: float = 0.1) -> dict[str, int]:
    inside = call_downstream(f"{app.conf.throttle_key_prefix}:downstream", seconds)
    return {"order_id": order_id, "callers_inside": inside}
