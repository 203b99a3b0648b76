"""The demo's own test setup, as an application keeps it: the celery-throttled pytest plugin
gives Redis, workers and the probe; this file adds the one service of the demo's own, the
fragile downstream, and puts the demo's packages on the path (as pytest's ``pythonpath``
option would in a project of its own)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from demo.downstream import Server  # noqa: E402  (importable once HERE is on the path)


@pytest.fixture
def downstream() -> Iterator[Server]:
    """The fragile downstream (capacity 5) on a free loopback port, in this process."""
    from celery_throttled.testing.redis import free_port
    from demo.downstream import serve

    server = serve("127.0.0.1", free_port(), capacity=5)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
