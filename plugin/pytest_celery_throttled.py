"""The pytest plugin of celery-throttled (``-p no:celery_throttled`` turns it off).

Registered through the ``pytest11`` entry point when the package is installed. It defines
fixtures and nothing else: no hook, no option, no import of Celery, Redis or the package
until a test uses one of them. See :mod:`celery_throttled.testing` for what each gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from celery_throttled.testing import ConcurrencyProbe, WorkerFactory

__all__ = ["throttle_prefix", "throttle_probe", "throttle_redis_url", "throttle_worker"]


@pytest.fixture(scope="session")
def throttle_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``REDIS_URL``, else a redis-server of the session's own (stopped at the end), working in
    a temporary directory. Under pytest-xdist each worker process has its own."""
    from celery_throttled.testing.redis import RedisServer, url_from_environment

    given = url_from_environment()
    if given:
        yield given
        return
    server = RedisServer(dir=tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def throttle_prefix() -> str:
    """A key prefix and queue name that no other test uses."""
    import uuid

    return f"tt{uuid.uuid4().hex[:10]}"


@pytest.fixture
def throttle_worker(
    request: pytest.FixtureRequest, throttle_redis_url: str, throttle_prefix: str, tmp_path: Path
) -> Iterator[WorkerFactory]:
    """Start real workers of your app: ``throttle_worker("proj", pool=..., concurrency=...)``.

    Workers are stopped when the test ends; their logs are shown when it failed.
    """
    from celery_throttled.testing import WorkerFactory

    factory = WorkerFactory(throttle_redis_url, throttle_prefix, tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()
        for worker in factory.started:  # shown by pytest only for a failed test
            request.node.add_report_section(
                "teardown",
                f"log of worker {worker.name} ({worker.pool})",
                worker.output()[-20000:],
            )


@pytest.fixture
def throttle_probe(throttle_redis_url: str, throttle_prefix: str) -> Iterator[ConcurrencyProbe]:
    """Peak concurrency per key in this test's workers, and the limiter's view of a key."""
    from celery_throttled.testing import ConcurrencyProbe

    probe = ConcurrencyProbe(throttle_redis_url, throttle_prefix)
    try:
        yield probe
    finally:
        probe.close()
