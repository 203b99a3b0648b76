"""The worker's two limiter threads: lease operations off the event loop, and grant messages.

The event loop never waits on Redis: the gate hands :class:`~.leases.Acquire` and
:class:`~.leases.Release` operations to the *operations* thread, which sends every operation
pending at that moment in one pipelined round trip, renews all of this worker's leases in one
more round trip every ``lease_ttl / 3``, and reports outcomes through callbacks. The *listener*
thread holds a pub/sub subscription on this worker's grant channel, so a slot freed anywhere
in the cluster reaches its waiter here within milliseconds.

Fail closed: while Redis is unreachable, operations stay queued (nothing is granted, so the cap
holds), one error is logged per outage, and both threads reconnect by themselves. After an
outage every lease and place in line is re-asserted before any new acquire is sent; if Redis
came back empty (its run id changed), new acquires also wait one grace period, so that the
other workers' running tasks are counted again before anyone is admitted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque

import redis

from ..keys import errgroup_channel, grant_channel, registry
from .base import (
    REGISTRY_BATCH,
    REGISTRY_RETENTION,
    REGISTRY_WINDOW,
    Callbacks,
    Outage,
    Transport,
    foreign_keys,
    server_identity,
)
from .leases import Acquire, Op, Outcome, RedisLeases, Renew

__all__ = ["ThreadedTransport"]

logger = logging.getLogger(__name__)

_BACKOFF = (0.05, 0.1, 0.25, 0.5)
_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


class ThreadedTransport(Transport):
    """The threaded transport: an operations thread and a listener thread."""

    name = "threads"

    def __init__(
        self,
        *,
        store: RedisLeases,
        client: redis.Redis,
        prefix: str,
        worker: str,
        lease_ttl: float,
        callbacks: Callbacks,
        where: str,
    ) -> None:
        self._store = store
        self._client = client
        self._registry = registry(prefix)
        self._channels = (grant_channel(prefix, worker), errgroup_channel(prefix))
        self._renew_every = lease_ttl / 3
        self._grace = min(1.0, lease_ttl / 3)
        self._cb = callbacks
        self._ops: deque[Op] = deque()
        self._to_register: set[str] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._renew_requested = False
        self._run_id: str | None = None
        self._acquire_after = 0.0
        self._outage = Outage(where)
        self._threads = [
            threading.Thread(target=self._operate, name="throttle-ops", daemon=True),
            threading.Thread(target=self._listen, name="throttle-listen", daemon=True),
        ]

    # -- public, thread-safe ------------------------------------------------------------
    def start(self) -> None:
        for thread in self._threads:
            if thread.ident is None:
                thread.start()

    def suspend(self) -> None:
        """The threads carry on: operations keep reaching Redis while the consumer is away."""

    def submit(self, op: Op) -> None:
        with self._cond:
            self._ops.append(op)
            self._cond.notify()

    def register(self, key: str) -> None:
        """Put ``key`` in the key registry soon (so any worker can reap its leases)."""
        with self._cond:
            self._to_register.add(key)
            self._cond.notify()

    def renew_soon(self) -> None:
        with self._cond:
            self._renew_requested = True
            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (bounded by ``timeout``), then stop both threads."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._ops and time.monotonic() < deadline and not self._outage.ongoing:
                self._cond.wait(0.05)
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()) + 0.5)

    # -- operations thread -----------------------------------------------------------------
    def _operate(self) -> None:
        next_renew = time.monotonic() + self._renew_every
        failures = 0
        while True:
            with self._cond:
                while (
                    not self._stopping
                    and not self._renew_requested
                    and not self._to_register
                    and not self._ready()
                ):
                    timeout = next_renew - time.monotonic()
                    if timeout <= 0:
                        break
                    if self._ops and time.monotonic() < self._acquire_after:
                        timeout = min(timeout, self._acquire_after - time.monotonic())
                    self._cond.wait(timeout)
                if self._stopping and not self._ops:
                    return
                renew = self._renew_requested or time.monotonic() >= next_renew
                self._renew_requested = False
                batch = self._take()
                register, self._to_register = self._to_register, set()
            try:
                if failures:  # back from an outage: is this a new Redis (or a new master)?
                    self._recovered()
                    batch = self._hold_acquires(batch)
                if register:
                    self._client.zadd(self._registry, dict.fromkeys(register, time.time()))
                if renew or failures:
                    self._renew_all()
                    next_renew = time.monotonic() + self._renew_every
                if batch:
                    self._apply(batch, self._store.execute(batch))
                failures = 0
                self._recovered()
            except _OUTAGE_ERRORS as exc:
                with self._cond:
                    self._ops.extendleft(reversed(batch))
                    self._to_register |= register
                self._outage.down(exc)
                time.sleep(_BACKOFF[min(failures, len(_BACKOFF) - 1)])
                failures += 1
                if self._stopping:
                    return
            except Exception:
                logger.exception("celery-throttled: lease operations failed; retrying")
                with self._cond:
                    self._ops.extendleft(reversed(batch))
                time.sleep(0.5)

    def _hold_acquires(self, batch: list[Op]) -> list[Op]:
        """During the grace after a restart or failover, acquires wait; the rest goes now."""
        if time.monotonic() >= self._acquire_after:
            return batch
        held = [op for op in batch if isinstance(op, Acquire)]
        with self._cond:
            self._ops.extendleft(reversed(held))
        return [op for op in batch if not isinstance(op, Acquire)]

    def _ready(self) -> bool:
        if not self._ops:
            return False
        if time.monotonic() >= self._acquire_after:
            return True
        return any(not isinstance(op, Acquire) for op in self._ops)

    def _take(self) -> list[Op]:
        if time.monotonic() >= self._acquire_after:
            batch = list(self._ops)
            self._ops.clear()
            return batch
        keep = [op for op in self._ops if isinstance(op, Acquire)]
        batch = [op for op in self._ops if not isinstance(op, Acquire)]
        self._ops.clear()
        self._ops.extend(keep)
        return batch

    def _renew_all(self) -> None:
        renewals = self._cb.snapshot()
        now = time.time()
        if renewals:
            self._client.zadd(self._registry, {op.key: now for op in renewals})
        self._client.zremrangebyscore(self._registry, "-inf", now - REGISTRY_RETENTION)
        members = self._client.zrevrangebyscore(
            self._registry, "+inf", now - REGISTRY_WINDOW, start=0, num=REGISTRY_BATCH
        )
        renewals += foreign_keys({op.key for op in renewals}, members)
        if renewals:
            self._apply(renewals, self._store.execute(renewals))

    def _apply(self, ops: list[Op] | list[Renew], outcomes: list[Outcome]) -> None:
        for op, outcome in zip(ops, outcomes, strict=True):
            self._cb.deliver(op, outcome)

    # -- listener thread ---------------------------------------------------------------------
    def _listen(self) -> None:
        failures = 0
        while not self._stopping:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(*self._channels)
                if failures:
                    self.renew_soon()  # grants sent while we were away are found by renewal
                failures = 0
                while not self._stopping:
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message["type"] == "message":
                        self._cb.message(message["data"])
            except _OUTAGE_ERRORS as exc:
                self._outage.down(exc)
                time.sleep(_BACKOFF[min(failures, len(_BACKOFF) - 1)])
                failures += 1
            finally:
                with contextlib.suppress(Exception):  # closing a broken connection
                    pubsub.close()

    # -- outages ---------------------------------------------------------------------------
    def _recovered(self) -> None:
        if not self._outage.ongoing and self._run_id is not None:
            return
        try:
            run_id = server_identity(self._client)
        except _OUTAGE_ERRORS:
            return
        if self._run_id is not None and run_id != self._run_id:
            self._acquire_after = time.monotonic() + self._grace
            self.renew_soon()
        self._run_id = run_id
        self._outage.up()
