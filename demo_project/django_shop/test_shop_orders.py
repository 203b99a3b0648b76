"""The Django example's tasks under the celery-throttled pytest plugin: a real worker of the
project (``celery -A shop``), found by autodiscovery and configured from Django's settings."""

from __future__ import annotations

import pytest

from celery_throttled.testing import ConcurrencyProbe, WorkerFactory, assert_envelope

pytestmark = pytest.mark.timeout(180)


def test_reservations_respect_the_warehouse_cap(
    throttle_worker: WorkerFactory,
    throttle_probe: ConcurrencyProbe,
    throttle_redis_url: str,
    throttle_prefix: str,
) -> None:
    """Given a threads worker of the Django project with six threads, when eight reservations
    are sent, then each envelope is ok with its sku, and at most two ran at once: the
    limit=2 the orders app declares on the "warehouse-api" key."""
    from orders.tasks import reserve_stock

    throttle_worker(
        "shop",
        pool="threads",
        concurrency=6,
        env={"REDIS_URL": throttle_redis_url, "SHOP_PREFIX": throttle_prefix},
    )
    results = [reserve_stock.delay(f"sku-{i}", 0.2) for i in range(8)]
    for i, result in enumerate(results):
        env = assert_envelope(result.get(timeout=60), ok=True, key="warehouse-api")
        assert env.value == {"sku": f"sku-{i}", "reserved": True}
    assert throttle_probe.peak("warehouse-api") == 2
