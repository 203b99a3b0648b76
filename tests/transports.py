"""A worker's side of the lease transport, for the contract test (tests/test_transport.py).

* :class:`Loop`: a kombu ``Hub`` running on a thread of its own, as the worker's event loop.
* :class:`Side`: one worker's holders as its gate keeps them (running, waiting, per key), the
  snapshot renewals are built from, and everything the transport reported back (grants, waits,
  lost holders, pub/sub messages), with waits that poll under a deadline.
* :func:`open_transport`: a transport of either kind, built by ``transport.build`` as the
  worker builds it (the event-loop kind checks that it did not fall back to threads).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.asynchronous import Hub

from celery_throttled.keys import grant_channel, holder_id
from celery_throttled.settings import Settings
from celery_throttled.transport import Callbacks, build
from celery_throttled.transport.leases import Acquire, Release, Renew

from .conftest import wait_until

KINDS = ("eventloop", "threads")
NAMES = {"eventloop": "event loop", "threads": "threads"}


class Loop:
    """A kombu event loop on its own thread (the worker runs it on its main thread)."""

    def __init__(self) -> None:
        self.hub = Hub()
        self.thread = threading.Thread(target=self.hub.run_forever, name="test-hub", daemon=True)
        self.thread.start()

    def call(self, fun: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fun`` on the loop thread and wait for it to return."""
        done = threading.Event()
        out: list[Any] = []

        def run() -> None:
            try:
                out.append(fun())
            finally:
                done.set()

        self.hub.call_soon(run)
        assert done.wait(timeout), f"the event loop did not run {fun!r} within {timeout}s"
        return out[0] if out else None

    def close(self) -> None:
        self.hub.stop()
        self.thread.join(10)
        self.hub.close()


@dataclass(frozen=True)
class Counted(Callbacks):
    """Callbacks that also count pub/sub messages (grants that came through the channel)."""

    on_message: Callable[[], None] = lambda: None

    def message(self, data: bytes | str) -> None:
        self.on_message()
        super().message(data)


class Side:
    """One worker: what its gate holds and what its transport told it."""

    def __init__(self, name: str = "w") -> None:
        self.worker = f"{name}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        # per key, holders in the order they came (dicts as ordered sets, as the gate's)
        self.running: dict[str, dict[str, None]] = {}
        self.waiting: dict[str, dict[str, None]] = {}
        self.caps: dict[str, int] = {}
        self.events: list[tuple[str, str, Any]] = []
        #: when each event was first seen (time.monotonic())
        self.first: dict[tuple[str, str, Any], float] = {}
        self.messages = 0
        self.snapshots = 0
        self.transport: Any = None

    def holder(self, task: str) -> str:
        return holder_id(self.worker, task)

    def callbacks(self) -> Callbacks:
        return Counted(
            self.snapshot, self.granted, self.lost, self.on_waiting, on_message=self._counted
        )

    # -- what the gate does ------------------------------------------------------------------
    def acquire(self, key: str, task: str, cap: int) -> str:
        holder = self.holder(task)
        with self._lock:
            self.waiting.setdefault(key, {})[holder] = None
            self.caps[key] = cap
        self.transport.submit(Acquire(key, holder, cap))
        return holder

    def release(self, key: str, task: str, later: bool = False) -> None:
        holder = self.holder(task)
        with self._lock:
            self.running.get(key, {}).pop(holder, None)
            self.waiting.get(key, {}).pop(holder, None)
            cap = self.caps.get(key, 1)
        self.transport.submit(Release(key, holder, cap, "done"), later=later)

    # -- what the transport calls --------------------------------------------------------------
    def snapshot(self) -> list[Renew]:
        with self._lock:
            self.snapshots += 1
            keys = [k for k, v in self.running.items() if v]
            keys += [k for k, v in self.waiting.items() if v and k not in keys]
            return [
                Renew(
                    k,
                    self.caps.get(k, 1),
                    list(self.running.get(k, ())),
                    list(self.waiting.get(k, ())),
                )
                for k in keys
            ]

    def granted(self, key: str, holder: str, room: int | None) -> None:
        with self._lock:
            self._record(("granted", key, holder))
            if self.waiting.get(key, {}).pop(holder, 0) is None:
                self.running.setdefault(key, {})[holder] = None

    def on_waiting(self, key: str, holder: str) -> None:
        with self._lock:
            self._record(("waiting", key, holder))

    def lost(self, key: str, holders: list[str]) -> None:
        with self._lock:
            self._record(("lost", key, tuple(holders)))

    def _record(self, event: tuple[str, str, Any]) -> None:
        self.events.append(event)
        self.first.setdefault(event, time.monotonic())

    def _counted(self) -> None:
        with self._lock:
            self.messages += 1

    # -- what the test reads -----------------------------------------------------------------
    def seen(self, kind: str, key: str, holder: Any) -> int:
        with self._lock:
            return sum(1 for event in self.events if event == (kind, key, holder))

    def wait_for(self, kind: str, key: str, holder: Any, timeout: float = 10.0) -> None:
        wait_until(
            lambda: self.seen(kind, key, holder),
            timeout,
            what=f"{kind} {key!r} {holder!r} (seen: {self.events})",
        )

    def wait_rounds(self, rounds: int, timeout: float = 10.0) -> None:
        """Wait until the transport took ``rounds`` more snapshots (renewal rounds)."""
        start = self.snapshots
        wait_until(
            lambda: self.snapshots >= start + rounds, timeout, what=f"{rounds} renewal rounds"
        )


@dataclass
class Opened:
    kind: str
    transport: Any
    loop: Loop | None

    def close(self) -> None:
        if self.loop is not None:
            self.loop.call(self.transport.suspend)
        self.transport.stop(2.0)


def open_transport(
    kind: str,
    loop: Loop,
    url: str,
    prefix: str,
    side: Side,
    lease_ttl: float,
    options: dict[str, Any] | None = None,
    hub: Any = None,
) -> Opened:
    """A transport of ``kind`` for ``side``, started, built as the worker builds it (``hub``:
    the event loop it is offered, by default the loop's for the event-loop kind, else none)."""
    app = Celery(set_as_current=False)
    app.conf.update(
        throttle_redis_url=url,
        throttle_key_prefix=prefix,
        throttle_lease_ttl=lease_ttl,
        throttle_redis_options=options,
    )
    if hub is None and kind == "eventloop":
        hub = loop.hub
    transport = build(
        Settings.from_app(app), hub=hub, worker=side.worker, callbacks=side.callbacks()
    )
    assert transport.name == NAMES[kind]
    side.transport = transport
    if kind == "eventloop":
        loop.call(transport.start)
        return Opened(kind, transport, loop)
    transport.start()
    return Opened(kind, transport, None)


def ready(side: Side, probe: redis.Redis, prefix: str) -> None:
    """Wait until ``side``'s transport listens on its grant channel and has sent an operation."""
    channel = grant_channel(prefix, side.worker)
    wait_until(
        lambda: (
            dict(probe.pubsub_numsub(channel)).get(channel.encode(), 0) >= 1
            or dict(probe.pubsub_numsub(channel)).get(channel, 0) >= 1
        ),
        10,
        what="the transport to subscribe to its grant channel",
    )
    key = f"warm-up {side.worker}"
    holder = side.acquire(key, "warm-up", 1)
    side.wait_for("granted", key, holder)


def local_ports_to(port: int) -> set[int]:
    return {sock.getsockname()[1] for sock in process_sockets_to(port)}


def process_sockets_to(port: int) -> Iterator[socket.socket]:
    """Every TCP socket of this process connected to 127.0.0.1:``port`` (Linux: /proc)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.family == socket.AF_INET and sock.getpeername() == ("127.0.0.1", port):
                yield sock
        except OSError:
            pass
        finally:
            sock.close()
