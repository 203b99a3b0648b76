"""Lease operations on two background threads, through redis-py.

The transport for every Redis the event loop cannot reach by itself (TLS, unix sockets,
Sentinel, Cluster, options it cannot honour) and for workers without an event loop. The
*operations* thread sends each batch :mod:`.base` makes due in two pipelined round trips (the
registry's commands, then the lease scripts); the *listener* thread holds the pub/sub
subscription to this worker's grant channel and the errgroups' channel.

redis-py reconnects by itself, silently, when it takes a pooled connection whose server went
away. So that a restarted or failed-over server is never missed, every new connection of this
transport's client first asks for the server's run id (``INFO server``, in the connection's
own handshake); a new server raises :class:`~.leases.ServerChanged` there, before anything is
sent on it, and so does a batch made before the other thread found a new server: the batch
goes back to the queue and waits for :mod:`.base`'s grace. The client does not retry by itself
(``retry`` is replaced): the transport does, after its own backoff.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from .base import Batch, Transport, backoff, run_id
from .leases import Op, RedisLeases, ServerChanged
from .reports import Callbacks

__all__ = ["ThreadedTransport"]

logger = logging.getLogger(__name__)

_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)

#: builds the transport's client, given the function to run on every new connection
Connect = Callable[[Callable[[Any], None]], redis.Redis]


class ThreadedTransport(Transport):
    """The threaded transport: an operations thread and a listener thread."""

    name = "threads"

    def __init__(
        self,
        *,
        connect: Connect,
        login: Callable[[Any], None] | None,
        prefix: str,
        worker: str,
        lease_ttl: float,
        callbacks: Callbacks,
        where: str,
    ) -> None:
        """``login`` runs first on every new connection (redis-py's handshake), unless None
        (a Cluster client runs it itself)."""
        super().__init__(
            prefix=prefix, worker=worker, lease_ttl=lease_ttl, callbacks=callbacks, where=where
        )
        self._login = login
        self._stopping = False
        self._sending: Batch | None = None  # on the operations thread
        self._threads = [
            threading.Thread(target=self._operate, name="throttle-ops", daemon=True),
            threading.Thread(target=self._listen, name="throttle-listen", daemon=True),
        ]
        self._client = connect(self._on_connect)  # a Cluster client connects right away
        self._store = RedisLeases(self._client, prefix, lease_ttl, worker)

    def start(self) -> None:
        for thread in self._threads:
            if thread.ident is None:
                thread.start()

    def suspend(self) -> None:
        """The threads carry on: operations keep reaching Redis while the consumer is away."""

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (bounded by ``timeout``), then stop both threads."""
        deadline = time.monotonic() + timeout
        self._now_not_later()
        with self._lock:
            while self._due(time.monotonic()) and time.monotonic() < deadline:
                if self.outage.ongoing or not self._threads[0].is_alive():
                    break
                self._lock.wait(0.05)
            self._stopping = True
            self._lock.notify_all()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()) + 0.5)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # -- the operations thread -----------------------------------------------------------------
    def _operate(self) -> None:
        while not self._stopping:
            with self._lock:
                while not self._stopping and not self._due(time.monotonic()):
                    self._lock.wait(max(0.0, self._next_due() - time.monotonic()))
            self._sending = batch = self._take()
            try:
                self._send(batch)
                self._recovered()
            except ServerChanged:  # nothing was sent; the grace holds the acquires back
                self._requeue(batch.operations(), batch.registered)
            except _OUTAGE_ERRORS as exc:
                self._requeue(batch.operations(), batch.registered)
                self._pause(self._failed(exc))
            except Exception as exc:
                self._requeue(batch.operations(), batch.registered)
                if not _caused_by_new_server(exc):
                    logger.exception("celery-throttled: lease operations failed; retrying")
                    self._pause(0.5)
            self._sending = None
            self._wake()  # stop() waits for the queue to empty

    def _send(self, batch: Batch) -> None:
        commands = batch.commands + (batch.round.commands if batch.round else [])
        ops: list[Op] = []
        if commands:
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            replies = pipe.execute()
            if batch.round is not None:
                ops += batch.round.renewals + batch.round.reaping(replies[-1])
        ops += batch.ops
        if ops:
            for op, outcome in zip(ops, self._store.execute(ops), strict=True):
                self.callbacks.deliver(op, outcome)

    def _pause(self, seconds: float) -> None:
        with self._lock:
            self._lock.wait_for(lambda: self._stopping, seconds)

    # -- every new connection ------------------------------------------------------------------
    def _on_connect(self, connection: Any) -> None:
        if self._login is not None:
            self._login(connection)
        connection.send_command("INFO", "server")
        try:
            found = run_id(connection.read_response())
        except redis.ResponseError:  # INFO refused
            found = ""
        address = getattr(connection, "path", None) or f"{connection.host}:{connection.port}"
        changed = self._connected(address, found)
        batch = self._sending if threading.current_thread() is self._threads[0] else None
        if changed or (batch is not None and self._stale(batch)):
            raise ServerChanged(f"the Redis at {address} is a new server (run id {found})")

    # -- the listener thread -------------------------------------------------------------------
    def _listen(self) -> None:
        failures, listened = 0, False
        while not self._stopping:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(*self.channels)
                if listened:
                    self.renew_soon()  # grants sent while nobody listened are found so
                failures, listened = 0, True
                while not self._stopping:
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message["type"] == "message":
                        self.callbacks.message(message["data"])
            except ServerChanged:
                continue
            except _OUTAGE_ERRORS as exc:
                self.outage.down(exc)
                self._pause(backoff(failures))
                failures += 1
            finally:
                with contextlib.suppress(Exception):  # closing a broken connection
                    pubsub.close()


def _caused_by_new_server(exc: BaseException) -> bool:
    """Whether ``exc`` came of a new server found in a connection's handshake: the cluster
    client wraps that (``RedisClusterException`` from its own reconnection), and the running
    leases must then go back at once, within the other workers' grace, not after a pause."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ServerChanged):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False
