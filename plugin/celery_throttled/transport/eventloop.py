"""Lease operations on the worker's own event loop: no threads, no waiting on Redis.

The preferred transport when the worker runs kombu's event loop (the hub): two non-blocking
connections to the limiter's Redis, registered with the hub like the broker's own sockets.

* The *command* connection carries acquire/release/renew script calls. A call is written the
  moment it is submitted; its reply is read when the socket turns readable, and the grants it
  carries are admitted right there, on the loop, without a thread hop.
* The *subscription* connection listens on this worker's grant channel: a slot freed on
  another worker reaches a waiter here as soon as the message arrives.

Fail closed, as the threaded transport: while Redis is unreachable operations wait in order
(nothing is granted, so the cap holds), one error is logged per outage, and both connections
come back by themselves with a backoff. After an outage every lease and place in line is
re-asserted first; if Redis came back empty (its run id changed), acquires also wait one grace
period. Once the consumer has stopped (worker shutdown), the loop no longer runs: operations
then go out synchronously through redis-py, so the releases of tasks finishing during a warm
shutdown are not lost.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .base import (
    REGISTRY_BATCH,
    REGISTRY_RETENTION,
    REGISTRY_WINDOW,
    Callbacks,
    Outage,
    Transport,
    foreign_keys,
    report_restored,
)
from .leases import Acquire, Codec, Op, RedisLeases, Renew, Scripts
from .resp import Parser, ReplyError, pack

__all__ = ["EventLoopTransport"]

logger = logging.getLogger(__name__)

_BACKOFF = (0.05, 0.1, 0.25, 0.5, 1.0)
_REPLY_TIMEOUT = 5.0


def _ignore(reply: Any) -> None:
    if isinstance(reply, ReplyError):
        logger.error("celery-throttled: Redis refused a setup command: %s", reply)


class _Connection:
    """One non-blocking socket to Redis on the hub; replies go to ``on_reply`` in order."""

    def __init__(
        self,
        hub: Any,
        address: tuple[str, int],
        handshake: list[bytes],
        on_reply: Callable[[Any], None],
        on_up: Callable[[], None],
        on_down: Callable[[BaseException], None],
    ) -> None:
        self.hub = hub
        self.address = address
        self.handshake = handshake
        self.on_reply = on_reply
        self.on_up = on_up
        self.on_down = on_down
        self.sock: socket.socket | None = None
        self.up = False
        self._out = bytearray()
        self._parser = Parser()
        self._handshake_left = 0
        self._flush_scheduled = False
        self._writer_registered = False
        self._candidates: list[tuple[int, Any]] = []

    def open(self) -> None:
        """Connect without blocking, trying each address the host resolves to in turn."""
        self.close()
        try:  # a name resolves here (localhost, an IPv6 literal, a service name)
            self._candidates = [
                (family, target)
                for family, _, _, _, target in socket.getaddrinfo(
                    *self.address, type=socket.SOCK_STREAM
                )
            ]
        except OSError as exc:
            self.on_down(exc)
            return
        self._try_next(None)

    def _try_next(self, error: BaseException | None) -> None:
        if not self._candidates:
            self._fail(error or OSError(f"no address to connect to for {self.address}"))
            return
        family, target = self._candidates.pop(0)
        self._drop_socket()
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._parser = Parser()
        code = sock.connect_ex(target)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._try_next(OSError(code, f"connect to {target}: {errno.errorcode.get(code)}"))
            return
        self.hub.add_writer(sock.fileno(), self._connected)

    def _connected(self) -> None:
        sock = self.sock
        if sock is None:
            return
        self.hub.remove_writer(sock.fileno())
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._try_next(OSError(code, f"connect to {self.address}: {errno.errorcode.get(code)}"))
            return
        self.hub.add_reader(sock.fileno(), self._readable)
        self._handshake_left = len(self.handshake)
        for command in self.handshake:
            self._write(command)
        if not self._handshake_left:
            self.up = True
            self.on_up()

    def send(self, data: bytes) -> None:
        self._write(data)

    def _write(self, data: bytes) -> None:
        """Buffer ``data``; everything written in one pass of the loop goes out in one send."""
        if self.sock is None:
            return
        self._out += data
        if not self._flush_scheduled and not self._writer_registered:
            self._flush_scheduled = True
            self.hub.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        sock = self.sock
        if sock is None or not self._out:
            return
        try:
            sent = sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(exc)
            return
        del self._out[:sent]
        if self._out and not self._writer_registered:
            self._writer_registered = True
            self.hub.add_writer(sock.fileno(), self._writable)
        elif not self._out and self._writer_registered:
            self._writer_registered = False
            self.hub.remove_writer(sock.fileno())

    def _writable(self) -> None:
        self._flush()

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        if not data:
            self._fail(ConnectionError(f"Redis at {self.address} closed the connection"))
            return
        for reply in self._parser.feed(data):
            if self._handshake_left:
                self._handshake_left -= 1
                if isinstance(reply, ReplyError):
                    self._fail(reply)
                    return
                if not self._handshake_left:
                    self.up = True
                    self.on_up()
                continue
            self.on_reply(reply)

    def _fail(self, exc: BaseException) -> None:
        self.close()
        self.on_down(exc)

    def close(self) -> None:
        self._candidates = []
        self._drop_socket()

    def _drop_socket(self) -> None:
        sock, self.sock = self.sock, None
        self.up = False
        self._out.clear()
        self._writer_registered = False
        if sock is not None:
            fd = sock.fileno()
            if fd >= 0:
                self.hub.remove(fd)
            sock.close()


class EventLoopTransport(Transport):
    """The event-loop transport; same contract as :class:`~.threads.ThreadedTransport`."""

    name = "event loop"

    def __init__(
        self,
        *,
        hub: Any,
        codec: Codec,
        sync_store: RedisLeases,
        params: dict[str, Any],
        channels: tuple[str, ...],
        lease_ttl: float,
        callbacks: Callbacks,
        registry: str,
        where: str,
    ) -> None:
        self.hub = hub
        self._cb = callbacks
        self._registry = registry
        self.codec = codec
        self._sync = sync_store
        self._renew_every = lease_ttl / 3
        self._grace = min(1.0, lease_ttl / 3)
        handshake = []
        if params.get("password"):
            auth = [params["username"]] if params.get("username") else []
            handshake.append(pack("AUTH", *auth, params["password"]))
        if params.get("db"):
            handshake.append(pack("SELECT", int(params["db"])))
        address = (str(params.get("host") or "localhost"), int(params.get("port") or 6379))
        self._cmd = _Connection(hub, address, handshake, self._reply, self._cmd_up, self._down)
        self._sub = _Connection(
            hub,
            address,
            [*handshake, pack("SUBSCRIBE", *channels)],
            self._message,
            self._sub_up,
            self._down,
        )
        self._inflight: deque[tuple[Op | None, Callable[[Any], None], float]] = deque()
        self._pending: deque[Op] = deque()
        self._foreign: deque[Op] = deque()
        self._foreign_lock = threading.Lock()
        self._foreign_scheduled = False
        self._loop_thread: int | None = None
        self._timers: list[Any] = []
        self._failures = 0
        self._outage = Outage(where)
        self._reconnect: Any = None
        self._acquire_after = 0.0
        self._run_id: bytes | None = None
        self._recovering = False
        self._direct = False
        self._stopped = False

    # -- lifecycle (loop thread) ---------------------------------------------------------------
    def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._direct = False
        self._stopped = False
        if not self._cmd.sock:
            self._cmd.open()
        if not self._sub.sock:
            self._sub.open()
        if not self._timers:
            self._timers = [
                self.hub.call_repeatedly(self._renew_every, self._renew),
                self.hub.call_repeatedly(1.0, self._watch),
            ]

    def suspend(self) -> None:
        """The consumer stops: close the sockets; operations go out synchronously until
        :meth:`start` is called again."""
        for timer in self._timers:
            self.hub.timer.cancel(timer)
        self._timers = []
        if self._reconnect is not None:
            self.hub.timer.cancel(self._reconnect)
            self._reconnect = None
        self._direct = True
        unsent = [*self._requeue_inflight(), *self._pending]
        self._pending.clear()
        self._cmd.close()
        self._sub.close()
        self._send_direct(unsent)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped = True
        with self._foreign_lock:
            ops = list(self._foreign)
            self._foreign.clear()
        self._send_direct([*self._pending, *ops])
        self._pending.clear()

    def renew_soon(self) -> None:
        self.submit_callback(self._renew)

    def register(self, key: str) -> None:
        """Put ``key`` in the key registry (so any worker can reap its leases); loop thread."""
        if self._cmd.up and not self._recovering:
            self._command(pack("ZADD", self._registry, time.time(), key), _ignore)
        # otherwise the next renewal registers it

    # -- submitting (any thread) ---------------------------------------------------------------
    def submit(self, op: Op) -> None:
        if self._direct:
            self._send_direct([op])
        elif threading.get_ident() == self._loop_thread:
            self._send(op)
        else:
            with self._foreign_lock:
                self._foreign.append(op)
                if self._foreign_scheduled:
                    return
                self._foreign_scheduled = True
            self.hub.call_soon(self._take_foreign)

    def submit_callback(self, fun: Callable[[], None]) -> None:
        if threading.get_ident() == self._loop_thread:
            fun()
        else:
            self.hub.call_soon(fun)

    def _take_foreign(self) -> None:
        with self._foreign_lock:
            ops = list(self._foreign)
            self._foreign.clear()
            self._foreign_scheduled = False
        for op in ops:
            self.submit(op)

    def _send_direct(self, ops: list[Op]) -> None:
        if not ops:
            return
        try:
            for outcome in self._sync.execute(ops):
                report_restored(outcome)
        except Exception as exc:  # the worker is stopping; leases will expire on their own
            logger.warning(
                "celery-throttled: could not send %d lease operation(s) at shutdown (%s); "
                "their leases expire after the lease TTL",
                len(ops),
                exc,
            )

    # -- the command connection (loop thread) ----------------------------------------------------
    def _send(self, op: Op) -> None:
        if not self._cmd.up or self._recovering:
            self._pending.append(op)
        elif isinstance(op, Acquire) and time.monotonic() < self._acquire_after:
            self._pending.append(op)
            self.hub.call_later(self._acquire_after - time.monotonic(), self._flush)
        else:
            self._write(op)

    def _write(self, op: Op, full_script: bool = False) -> None:
        script, keys, args = self.codec.call(op)
        if full_script:
            data = pack("EVAL", script.source, len(keys), *keys, *args)
        else:
            data = pack("EVALSHA", script.sha, len(keys), *keys, *args)
        self._inflight.append((op, lambda reply: self._result(op, reply), time.monotonic()))
        self._cmd.send(data)

    def _result(self, op: Op, reply: Any) -> None:
        if isinstance(reply, ReplyError):
            if str(reply).startswith("NOSCRIPT"):  # the scripts were flushed meanwhile
                if not isinstance(op, Renew):  # a late renewal could revive released leases
                    self._write(op, full_script=True)
                return
            logger.error("celery-throttled: Redis refused a lease operation %r: %s", op, reply)
            return
        self._cb.deliver(op, self.codec.decode(op, reply))

    def _reply(self, reply: Any) -> None:
        if self._inflight:
            _, callback, _ = self._inflight.popleft()
            callback(reply)

    def _flush(self) -> None:
        if not self._cmd.up or self._recovering:
            return
        now = time.monotonic()
        held: deque[Op] = deque()
        while self._pending:
            op = self._pending.popleft()
            if isinstance(op, Acquire) and now < self._acquire_after:
                held.append(op)
            else:
                self._write(op)
        self._pending = held
        if held:
            self.hub.call_later(self._acquire_after - now, self._flush)

    def _renew(self) -> None:
        if self._direct or not self._cmd.up:
            return
        renewals = self._cb.snapshot()
        for op in renewals:
            self._write(op)  # renewals jump the queue: they protect running leases
        now = time.time()
        known = {op.key for op in renewals}
        if known:
            pairs = [part for key in known for part in (now, key)]
            self._command(pack("ZADD", self._registry, *pairs), _ignore)
        stale = now - REGISTRY_RETENTION
        self._command(pack("ZREMRANGEBYSCORE", self._registry, "-inf", stale), _ignore)
        query = pack(
            "ZREVRANGEBYSCORE",
            self._registry,
            "+inf",
            now - REGISTRY_WINDOW,
            "LIMIT",
            0,
            REGISTRY_BATCH,
        )
        self._command(query, lambda reply: self._reap(known, reply))

    def _reap(self, known: set[str], reply: Any) -> None:
        if isinstance(reply, list):
            for op in foreign_keys(known, reply):
                self._write(op)

    def _command(self, data: bytes, callback: Callable[[Any], None]) -> None:
        self._inflight.append((None, callback, time.monotonic()))
        self._cmd.send(data)

    def _cmd_up(self) -> None:
        """Load the scripts and learn the server's run id before anything else is sent.

        Replies come in order, so by the time INFO answers the scripts are there: no call
        meets NOSCRIPT and is sent again out of order (a renewal sent again after a release
        would put the released lease back).
        """
        self._recovering = True
        for name in ("acquire.lua", "release.lua", "renew.lua"):
            self._command(pack("SCRIPT", "LOAD", Scripts.get(name).source), _ignore)
        self._command(pack("INFO", "server"), self._info)

    def _info(self, reply: Any) -> None:
        run_id = None
        if isinstance(reply, bytes):
            for line in reply.splitlines():
                if line.startswith(b"run_id:"):
                    run_id = line.split(b":", 1)[1].strip()
        if self._run_id is not None and run_id != self._run_id:
            self._acquire_after = time.monotonic() + self._grace
        self._run_id = run_id
        self._recovering = False
        self._outage.up()
        self._failures = 0
        self._renew()
        self._flush()

    # -- the subscription connection -------------------------------------------------------
    def _sub_up(self) -> None:
        self._renew()  # grants published while we were not listening are found by renewal

    def _message(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
            self._cb.message(reply[2])

    # -- outages ---------------------------------------------------------------------------
    def _down(self, exc: BaseException) -> None:
        if self._direct or self._stopped:
            return
        self._outage.down(exc)
        self._pending.extendleft(reversed(self._requeue_inflight()))
        self._cmd.close()
        self._sub.close()
        if self._reconnect is None:
            delay = _BACKOFF[min(self._failures, len(_BACKOFF) - 1)]
            self._failures += 1
            self._reconnect = self.hub.call_later(delay, self._reopen)

    def _requeue_inflight(self) -> list[Op]:
        # Acquires and releases are idempotent and go out again; a renewal is a snapshot of
        # that moment and must not: sent late it would put back leases released since.
        ops: list[Op] = [
            op for op, _, _ in self._inflight if op is not None and not isinstance(op, Renew)
        ]
        self._inflight.clear()
        return ops

    def _reopen(self) -> None:
        self._reconnect = None
        if self._direct:
            return
        self._cmd.open()
        self._sub.open()

    def _watch(self) -> None:
        """A Redis that stops answering without closing the socket is an outage too."""
        if self._inflight and time.monotonic() - self._inflight[0][2] > _REPLY_TIMEOUT:
            self._down(TimeoutError(f"no reply from Redis in {_REPLY_TIMEOUT:.0f}s"))
