"""Found by ``app.autodiscover_tasks()``, like any Django app's tasks module."""

import os
import time

import redis

from celery_throttled import throttled_task

_probe = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
# KEYS[1] - callers inside now; KEYS[2] - the most ever inside at once
_enter = _probe.register_script(
    """
    local n = redis.call('INCR', KEYS[1])
    if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
    return n
    """
)


@throttled_task(limit=2, key="warehouse-api")
def reserve_stock(sku: str, seconds: float = 0.2) -> dict[str, object]:
    """Reserve stock at a warehouse API that takes two callers at once."""
    base = f"{os.environ.get('SHOP_PREFIX', 'shop')}:probe:warehouse"
    _enter([f"{base}:now", f"{base}:peak"])
    try:
        time.sleep(seconds)
    finally:
        _probe.decr(f"{base}:now")
    return {"sku": sku, "reserved": True}
