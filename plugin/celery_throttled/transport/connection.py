"""One non-blocking connection to Redis on the worker's event loop (kombu's hub).

The event-loop transport opens two (commands, and grant messages), each configured by an
:class:`~.endpoint.Endpoint`: the socket options are set before connecting, the handshake
(``AUTH``, ``CLIENT SETNAME``, ``SELECT``) is the first thing sent, and the two timeouts are
watched. Commands are packed by ``hiredis.pack_command`` and replies parsed by
``hiredis.Reader`` (``benchmarks/bench_resp.py`` measures both against the hand-written code
they replaced).
"""

from __future__ import annotations

import errno
import socket
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import hiredis
import redis

from .endpoint import Command, Endpoint

__all__ = ["Connection"]

Callback = Callable[[Any], None]


class Connection:
    """One non-blocking socket to Redis on the hub.

    :meth:`request` sends a command whose reply comes back, in order, to its callback; a reply
    nobody asked for (a pub/sub message, a subscription's confirmation) goes to ``on_push``.
    ``on_up`` is called once the handshake is through; ``on_down`` with the error and the tags
    of the requests left unanswered, after which the connection is closed.
    """

    def __init__(
        self,
        hub: Any,
        endpoint: Endpoint,
        on_up: Callable[[], None],
        on_down: Callable[[BaseException, list[Any]], None],
        on_push: Callback | None = None,
    ) -> None:
        self.hub = hub
        self.endpoint = endpoint
        self.on_up = on_up
        self.on_down = on_down
        self.on_push = on_push
        self.sock: socket.socket | None = None
        self.up = False
        self._reader = hiredis.Reader()
        self._out = bytearray()
        self._pending: deque[tuple[Callback, Any, float]] = deque()
        self._flush_scheduled = False
        self._writer_registered = False
        self._candidates: list[tuple[int, Any]] = []
        self._opened_at = 0.0
        self._handshake_left = 0

    def open(self) -> None:
        """Connect without blocking, trying each address the host resolves to in turn."""
        self.close()
        self._opened_at = time.monotonic()
        endpoint = self.endpoint
        try:  # a name resolves here (localhost, an IPv6 literal, a service name)
            found = socket.getaddrinfo(
                endpoint.host, endpoint.port, endpoint.family, socket.SOCK_STREAM
            )
        except OSError as exc:
            self.on_down(exc, [])
            return
        self._candidates = [(family, target) for family, _, _, _, target in found]
        self._try_next(None)

    def request(self, command: Command, callback: Callback, tag: Any = None) -> None:
        if self.sock is not None:
            self._pending.append((callback, tag, time.monotonic()))
            self._write(hiredis.pack_command(command))

    def send(self, command: Command) -> None:
        """A command whose replies go to ``on_push`` (``SUBSCRIBE``)."""
        if self.sock is not None:
            self._write(hiredis.pack_command(command))

    def check(self, now: float) -> None:
        """A server that stops answering without closing the socket is a failure too."""
        endpoint = self.endpoint
        if self.sock is None:
            return
        if (
            not self.up
            and endpoint.connect_timeout
            and now - self._opened_at > (endpoint.connect_timeout)
        ):
            self._fail(TimeoutError(f"connecting took over {endpoint.connect_timeout:g}s"))
        elif (
            self._pending
            and endpoint.reply_timeout
            and now - self._pending[0][2] > (endpoint.reply_timeout)
        ):
            self._fail(TimeoutError(f"no reply from Redis in {endpoint.reply_timeout:g}s"))

    def close(self) -> list[Any]:
        """Close the socket; returns the tags of the requests left unanswered."""
        tags = [tag for _, tag, _ in self._pending if tag is not None]
        self._pending.clear()
        self._candidates = []
        sock, self.sock = self.sock, None
        self.up = False
        self._out.clear()
        self._writer_registered = False
        if sock is not None:
            fd = sock.fileno()
            if fd >= 0:
                self.hub.remove(fd)
            sock.close()
        return tags

    # -- connecting ----------------------------------------------------------------------------
    def _try_next(self, error: BaseException | None) -> None:
        if not self._candidates:
            self._fail(error or OSError(f"no address to connect to for {self.endpoint.address}"))
            return
        family, target = self._candidates.pop(0)
        if self.sock is not None:
            self.hub.remove(self.sock.fileno())
            self.sock.close()
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.endpoint.keepalive is not None:  # as redis-py sets them
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in self.endpoint.keepalive.items():
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
        self.sock = sock
        self._reader = hiredis.Reader()
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
            reason = errno.errorcode.get(code)
            self._try_next(OSError(code, f"connect to {self.endpoint.address}: {reason}"))
            return
        self._candidates = []
        self.hub.add_reader(sock.fileno(), self._readable)
        self._handshake_left = len(self.endpoint.handshake)
        for command in self.endpoint.handshake:
            self.request(command, partial(self._handshaken, str(command[0])))
        if not self._handshake_left:
            self._ready()

    def _handshaken(self, name: str, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):  # never the command itself: it may hold secrets
            self._fail(redis.ConnectionError(f"Redis refused {name}: {reply}"))
            return
        self._handshake_left -= 1
        if not self._handshake_left:
            self._ready()

    def _ready(self) -> None:
        self.up = True
        self.on_up()

    # -- moving bytes ----------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        """Buffer ``data``; everything written in one pass of the loop goes out in one send.

        The send happens on the hub's tick, just before it polls: a write made by a timer (a
        renewal round, a rate's wake-up) would otherwise wait for the poll to time out, since
        the hub's ``call_soon`` does not wake a poll from the loop's own thread.
        """
        self._out += data
        if not self._flush_scheduled and not self._writer_registered:
            self._flush_scheduled = True
            self.hub.on_tick.add(self._flush_on_tick)

    def _flush_on_tick(self) -> None:
        self.hub.on_tick.discard(self._flush_on_tick)
        self._flush()

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
            self.hub.add_writer(sock.fileno(), self._flush)
        elif not self._out and self._writer_registered:
            self._writer_registered = False
            self.hub.remove_writer(sock.fileno())

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
            where = self.endpoint.address
            self._fail(redis.ConnectionError(f"Redis at {where} closed the connection"))
            return
        self._reader.feed(data)
        while self.sock is sock:  # a callback may close the connection
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(exc)
                return
            if reply is False:
                return
            if self._pending:
                callback, _, _ = self._pending.popleft()
                callback(reply)
            elif self.on_push is not None:
                self.on_push(reply)

    def _fail(self, exc: BaseException) -> None:
        self.on_down(exc, self.close())
