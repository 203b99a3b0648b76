"""Threads that watch a benchmark row while it runs: a periodic sampler, and a MONITOR reader.

Both run from ``__enter__`` (or :meth:`start`) to ``__exit__`` (or :meth:`stop`); a subclass
says what one sample, or one line of Redis's MONITOR stream, adds to its figures.
"""

from __future__ import annotations

import threading
from typing import TypeVar

import redis

__all__ = ["MonitorReader", "Periodic"]

P = TypeVar("P", bound="Periodic")
M = TypeVar("M", bound="MonitorReader")


class Periodic:
    """Calls :meth:`sample` every ``interval`` seconds, in a thread, until stopped."""

    interval = 0.05

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def start(self: P) -> P:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self: P) -> P:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


class MonitorReader:
    """Hands every line of a Redis server's MONITOR stream to :meth:`line`, in a thread.

    ``__enter__`` returns once MONITOR is on; ``__exit__`` sends an ECHO of a marker and stops
    when the stream reaches it, so every command sent before ``__exit__`` has been read.
    """

    STOP = b"bench-monitor-stop"

    def __init__(self, url: str) -> None:
        # no socket timeout: MONITOR may be quiet for longer than redis-py's default
        self._client = redis.Redis.from_url(url, socket_timeout=None)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def line(self, line: bytes) -> None:
        raise NotImplementedError

    def __enter__(self: M) -> M:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.echo(self.STOP)
        self._thread.join(60)
        self._client.close()

    def _run(self) -> None:
        connection = self._client.connection_pool.get_connection()
        connection.send_command("MONITOR")
        connection.read_response()
        self._ready.set()
        while True:
            line = connection.read_response()
            if self.STOP in line:
                break
            self.line(line)
        connection.disconnect()
