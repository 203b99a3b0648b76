"""Lease operations on the worker's own event loop: no threads, no waiting on Redis.

The preferred transport when the worker runs kombu's event loop (the hub): two non-blocking
connections (:mod:`.connection`) to the limiter's Redis, registered with the hub like the
broker's own sockets.

* The *command* connection carries the lease scripts and the registry's commands. A batch is
  written the moment it is due (an operation submitted on the loop goes out in the same pass);
  replies are read when the socket turns readable, and the grants they carry are admitted
  right there, on the loop, without a thread hop. On connecting it loads the scripts and asks
  for the server's run id before anything else (:meth:`.base.Transport._connected`).
* The *subscription* connection listens on this worker's grant channel and the errgroups'
  channel: a slot freed on another worker reaches a waiter here as soon as the message arrives.

What goes out when is :mod:`.base`'s business. Once the consumer has stopped (worker shutdown),
the loop no longer runs: operations then go out synchronously through redis-py, so the releases
of tasks finishing during a warm shutdown are not lost.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from typing import Any

import redis

from .base import Round, Transport, run_id
from .connection import Connection
from .endpoint import Endpoint
from .leases import Op, RedisLeases
from .reports import Callbacks
from .scripts import Scripts

__all__ = ["EventLoopTransport"]

logger = logging.getLogger(__name__)

SCRIPTS = ("acquire.lua", "release.lua", "renew.lua")


def _ignore(reply: Any) -> None:
    if isinstance(reply, Exception):
        logger.error("celery-throttled: Redis refused a limiter command: %s", reply)


class EventLoopTransport(Transport):
    """The event-loop transport: two non-blocking connections on the worker's hub."""

    name = "event loop"

    def __init__(
        self,
        *,
        hub: Any,
        client: redis.Redis,
        prefix: str,
        worker: str,
        lease_ttl: float,
        callbacks: Callbacks,
        where: str,
    ) -> None:
        super().__init__(
            prefix=prefix, worker=worker, lease_ttl=lease_ttl, callbacks=callbacks, where=where
        )
        self.hub = hub
        self.endpoint = Endpoint.of(client)
        self._sync = RedisLeases(client, prefix, lease_ttl, worker)
        self._cmd = Connection(hub, self.endpoint, self._cmd_up, self._down)
        self._sub = Connection(hub, self.endpoint, self._sub_up, self._down, self._pushed)
        self._ready = False  # the command connection is up and its server known
        self._subscribed = 0
        self._loop_thread: int | None = None
        self._wake_lock = threading.Lock()
        self._flush_scheduled = False
        self._direct_lock = threading.Lock()
        self._direct = False
        self._stopped = False
        self._timer: Any = None
        self._timer_at = float("inf")
        self._watchdog: Any = None
        self._reconnect: Any = None

    # -- lifecycle (the loop thread) -----------------------------------------------------------
    def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._direct = self._stopped = False
        if self._cmd.sock is None:
            self._cmd.open()
        if self._sub.sock is None:
            self._sub.open()
        if self._watchdog is None:
            self._watchdog = self.hub.call_repeatedly(1.0, self._watch)

    def suspend(self) -> None:
        """Close the sockets; operations go out synchronously until :meth:`start` again."""
        for entry in (self._watchdog, self._timer, self._reconnect):
            if entry is not None:
                self.hub.timer.cancel(entry)
        self._watchdog = self._timer = self._reconnect = None
        self._timer_at = float("inf")
        self._direct, self._ready = True, False
        self._requeue(self._cmd.close())
        self._sub.close()
        self._send_direct()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped = self._direct = True
        self._send_direct()

    # -- sending ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._direct:
            self._send_direct()
        elif threading.get_ident() == self._loop_thread:
            self._flush()
        else:
            with self._wake_lock:
                if self._flush_scheduled:
                    return
                self._flush_scheduled = True
            self.hub.call_soon(self._flush)

    def _flush(self) -> None:
        with self._wake_lock:
            self._flush_scheduled = False
        if not self._ready or self._direct:
            return
        batch = self._take()
        if batch.round is not None:
            self._send_round(batch.round)
        for command in batch.commands:
            self._cmd.request(command, _ignore)
        for op in batch.ops:
            self._write(op)
        self._arm()

    def _arm(self) -> None:
        """Have :meth:`_flush` called when something next falls due."""
        due = self._next_due()
        if self._timer is not None:
            if self._timer_at <= due:
                return
            self.hub.timer.cancel(self._timer)
        self._timer_at = due
        self._timer = self.hub.call_later(max(0.0, due - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self._flush()

    def _send_round(self, round_: Round) -> None:
        for op in round_.renewals:
            self._write(op)
        *upkeep, query = round_.commands
        for command in upkeep:
            self._cmd.request(command, _ignore)
        self._cmd.request(query, lambda members: self._reap(round_, members))

    def _reap(self, round_: Round, members: Any) -> None:
        for op in round_.reaping(members):
            self._write(op)

    def _write(self, op: Op, full_script: bool = False) -> None:
        script, keys, args = self.codec.call(op)
        head = ("EVAL", script.source) if full_script else ("EVALSHA", script.sha)
        self._cmd.request((*head, len(keys), *keys, *args), partial(self._result, op), tag=op)

    def _result(self, op: Op, reply: Any) -> None:
        again = self._report(op, reply)
        if again is not None:
            self._write(again, full_script=True)

    def _send_direct(self) -> None:
        """Send what is queued through redis-py, now (the loop is not running)."""
        with self._direct_lock:
            ops = self._drain()
            if not ops:
                return
            try:
                for op, outcome in zip(ops, self._sync.execute(ops), strict=True):
                    self.callbacks.deliver(op, outcome)
            except Exception as exc:  # the worker is stopping; leases will expire on their own
                logger.warning(
                    "celery-throttled: could not send %d lease operation(s) at shutdown (%s); "
                    "their leases expire after the lease TTL",
                    len(ops),
                    exc,
                )

    # -- the connections -----------------------------------------------------------------------
    def _cmd_up(self) -> None:
        """Load the scripts and learn the server's run id before anything else is sent.

        Replies come in order, so by the time INFO answers the scripts are there: no call
        meets NOSCRIPT and is sent again out of order.
        """
        for name in SCRIPTS:
            self._cmd.request(("SCRIPT", "LOAD", Scripts.get(name).source), _ignore)
        self._cmd.request(("INFO", "server"), self._info)

    def _info(self, reply: Any) -> None:
        self._connected(self.endpoint.address, run_id(reply))
        self._ready = True
        self._recovered()
        self._flush()

    def _sub_up(self) -> None:
        self._subscribed = 0
        for channel in self.channels:
            self._sub.send(("SUBSCRIBE", channel))

    def _pushed(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) != 3:
            return
        if reply[0] == b"message":
            self.callbacks.message(reply[2])
        elif reply[0] == b"subscribe":
            self._subscribed += 1
            if self._subscribed == len(self.channels):
                self.renew_soon()  # grants published while nobody listened are found so

    def _down(self, exc: BaseException, in_flight: list[Any]) -> None:
        if self._direct or self._stopped:
            return
        self._ready = False
        self._requeue([*in_flight, *self._cmd.close()])
        self._sub.close()
        delay = self._failed(exc)
        if self._reconnect is None:
            self._reconnect = self.hub.call_later(delay, self._reopen)

    def _reopen(self) -> None:
        self._reconnect = None
        if not self._direct:
            self._cmd.open()
            self._sub.open()

    def _watch(self) -> None:
        now = time.monotonic()
        self._cmd.check(now)
        self._sub.check(now)
