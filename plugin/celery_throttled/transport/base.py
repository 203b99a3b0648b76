"""The lease transport's interface, and every rule both transports follow, written once.

A transport carries :class:`~.leases.Acquire`, :class:`~.leases.Release` and
:class:`~.leases.Renew` operations to Redis and reports what they did through
:class:`Callbacks`. The implementations (:mod:`.eventloop`, :mod:`.threads`) only move bytes;
what to send and when is decided here:

* **The queue.** Submitted operations wait in one queue, in order, and leave it in batches.
  A release submitted ``later`` (the worker's safety net for a slot its pool process freed
  already) is no operation of its own: it rides in the next acquire of its key, or in its
  key's renewal of the next round (:mod:`.ended`).
* **Renewal rounds**, every ``lease_ttl / 3``, on request, after every (re)connection, and once
  more when a grace ends: this worker's leases and places in line (``Callbacks.snapshot``),
  the key registry's upkeep, then reaping passes (``Renew(key, 0)``) over registered keys this
  worker has nothing of, whose expired leases are reported ``lost`` by whoever reaps them.
* **The server's identity.** Every new connection learns the run id of the server behind it.
  A server seen before with another run id (or, after an outage, a new address: a failover)
  may have lost every lease. Its running leases are put back by the next round at once, but
  for one grace period (``min(1 s, lease_ttl / 3)``) nothing of this worker's waiting line
  reaches Redis: acquires stay queued and renewals leave out waiters (renewing one that
  vanished enqueues it, and may grant it), so that the other workers' running tasks are
  counted again before anyone is admitted. A release of a holder whose acquire is held back
  cancels that acquire.
* **Failures.** Acquires and releases that were in flight go out again (each is idempotent);
  renewals do not (a snapshot of that moment: sent late it would put back leases released
  since). One backoff table; one error per outage and one warning when it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import replace
from typing import Any

from ..keys import errgroup_channel, grant_channel, registry
from .batch import Batch, Round, registering
from .ended import Ended, again, carried, hold_back
from .leases import Acquire, Codec, Op, Release
from .reports import Callbacks, Outage

__all__ = ["BACKOFF", "Batch", "Callbacks", "Outage", "Round", "Transport", "backoff", "run_id"]

logger = logging.getLogger(__name__)

#: seconds before the n-th reconnection attempt in a row (the last one repeats)
BACKOFF = (0.05, 0.1, 0.25, 0.5, 1.0)


def backoff(failures: int) -> float:
    return BACKOFF[min(failures, len(BACKOFF) - 1)]


def run_id(info: Any) -> str:
    """The ``run_id`` in a reply to ``INFO server``; empty when there is none (a server that
    refuses INFO: then every reconnection after an outage waits the grace, to be safe)."""
    if not isinstance(info, (bytes, str)):
        return ""
    text = info.decode() if isinstance(info, bytes) else info
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.split(":", 1)[1].strip()
    return ""


class Transport(ABC):
    """How one worker's lease operations reach Redis, and grants come back.

    Fail closed: while Redis is unreachable operations wait (nothing is granted, so the cap
    holds) and the transport reconnects by itself.
    """

    #: how the worker's start-up log line names it
    name: str

    def __init__(
        self, *, prefix: str, worker: str, lease_ttl: float, callbacks: Callbacks, where: str
    ) -> None:
        self.codec = Codec(prefix, lease_ttl, worker)
        self.callbacks = callbacks
        self.registry = registry(prefix)
        #: this worker's grant channel, and the errgroups' cancellation channel
        self.channels = (grant_channel(prefix, worker), errgroup_channel(prefix))
        self.outage = Outage(where)
        self.renew_every = lease_ttl / 3
        self.grace = min(1.0, lease_ttl / 3)
        self._lock = threading.Condition()
        self._queue: deque[Op] = deque()
        self._ended = Ended()
        self._to_register: set[str] = set()
        self._next_round = time.monotonic() + self.renew_every
        self._round_requested = False
        self._acquire_after = 0.0
        self._round_after_grace = False
        self._servers: dict[str, str] = {}
        self._failures = 0
        #: how many times a new server was found; a batch made before the last one is stale
        self._server = 0

    # -- the interface ---------------------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """Called at every consumer start, on the consumer's thread; idempotent."""

    @abstractmethod
    def suspend(self) -> None:
        """The consumer stops (shutdown, or reconnecting to the broker); :meth:`start` may
        follow. Operations submitted meanwhile still reach Redis."""

    @abstractmethod
    def stop(self, timeout: float = 5.0) -> None:
        """The process exits: send what is queued, bounded by ``timeout``, and stop."""

    def submit(self, op: Op, later: bool = False, within: float | None = None) -> None:
        """Send ``op`` soon (``later``, a release: with the key's next acquire or renewal,
        :mod:`.ended`, or within ``within`` seconds at the latest); its outcome comes back
        through the callbacks. Any thread."""
        with self._lock:
            if later and isinstance(op, Release):
                due = self._ended.due_at
                by = None if within is None else time.monotonic() + within
                full = self._ended.add(op, by)
                if full is not None:
                    self._queue.append(full)
                elif self._ended.due_at >= due:  # no earlier date to set a timer for
                    return
            else:
                self._queue.append(op)
        self._wake()

    def register(self, key: str) -> None:
        """Put ``key`` in the key registry soon (so any worker can reap its leases)."""
        with self._lock:
            self._to_register.add(key)
        self._wake()

    def renew_soon(self) -> None:
        """Renew every lease and place in line now rather than at the next period."""
        with self._lock:
            self._round_requested = True
        self._wake()

    @abstractmethod
    def _wake(self) -> None:
        """Something may be due: have :meth:`_take` called soon (from any thread)."""

    # -- what to send, and when (for the implementations) ----------------------------------
    def _due(self, now: float) -> bool:
        """Whether :meth:`_take` has something to send; with the lock held."""
        if self._round_requested or now >= self._next_round or self._to_register:
            return True
        if now >= self._ended.due_at:
            return True
        if self._round_after_grace and now >= self._acquire_after:
            return True
        if now >= self._acquire_after:
            return bool(self._queue)
        return any(not isinstance(op, Acquire) for op in self._queue)

    def _next_due(self) -> float:
        """The ``time.monotonic()`` at which something next falls due, if nothing is sent."""
        with self._lock:
            first = min(self._next_round, self._ended.due_at)
            if self._queue or self._round_after_grace:
                return min(first, self._acquire_after)
            return first

    def _take(self) -> Batch:
        """Take what is due now: a round (if due), registrations, and every queued operation
        but the acquires held back by a grace."""
        now = time.monotonic()
        with self._lock:
            grace = now < self._acquire_after
            due = self._round_requested or now >= self._next_round
            if self._round_after_grace and not grace:
                self._round_after_grace, due = False, True
            if due:
                self._round_requested = False
                self._next_round = now + self.renew_every
            registered, self._to_register = self._to_register, set()
            ops = list(self._queue)
            self._queue.clear()
            if grace:
                ops = self._hold_acquires(ops)
            ops = [self._ended.carry(op) if isinstance(op, Acquire) else op for op in ops]
            ended = self._ended.take() if due else {}
            if now >= self._ended.due_at:  # releases that may wait no longer
                ops += self._ended.renewals()
            server = self._server
        batch = Batch(self._round(grace, ended) if due else None, registered=registered, ops=ops)
        batch.server = server
        if registered:
            batch.commands.append(registering(self.registry, registered, time.time()))
        return batch

    def _hold_acquires(self, ops: list[Op]) -> list[Op]:
        """Put the acquires back in the queue (with the lock held); a release cancels the
        held acquire of its holder."""
        held, now = hold_back(ops)
        self._queue.extend(held)
        return now

    def _round(self, grace: bool, ended: dict[str, list[Release]]) -> Round:
        """The round's renewals (the snapshot is taken after ``ended`` was: a holder in both
        left in between; it goes as ended), with the releases that waited for it."""
        renewals = self.callbacks.snapshot()
        if grace:  # running leases only: a renewed waiter could be granted
            renewals = [replace(op, waiting=()) for op in renewals]
        return Round.of(carried(renewals, ended), self.registry, time.time())

    def _now_not_later(self) -> None:
        """The releases waiting for the next round go with the next batch (the process stops)."""
        with self._lock:
            self._queue.extend(self._ended.renewals())

    def _drain(self) -> list[Op]:
        """Everything queued, grace or not (the process is stopping)."""
        self._now_not_later()
        with self._lock:
            ops = list(self._queue)
            self._queue.clear()
            return ops

    def _requeue(self, ops: list[Op], registered: set[str] | None = None) -> None:
        """Sending ``ops`` failed: they go out again first, but renewals do not (the releases
        they carry do)."""
        with self._lock:
            ops = [op for op in map(again, ops) if op is not None]
            self._queue.extendleft(reversed(ops))
            self._to_register |= registered or set()

    def _report(self, op: Op, reply: Any) -> Op | None:
        """Report what ``op`` did from its reply; returns what must go again with its script's
        source (the scripts were flushed): ``op``, but of a renewal only the releases it carries
        (see :meth:`_requeue`)."""
        if isinstance(reply, Exception):
            if str(reply).startswith("NOSCRIPT"):
                return again(op)
            logger.error("celery-throttled: Redis refused a lease operation %r: %s", op, reply)
            return None
        self.callbacks.deliver(op, self.codec.decode(op, reply))
        return None

    # -- the server ------------------------------------------------------------------------
    def _connected(self, address: str, run_id: str) -> bool:
        """A new connection reached the server at ``address``, whose run id is ``run_id``.

        Returns whether that is another server than before (restarted, or failed over): the
        grace starts, and whatever was about to go out on the connection must not.
        """
        with self._lock:
            known = self._servers.get(address)
            changed = run_id != known if known else bool(self._servers) and self.outage.ongoing
            self._servers[address] = run_id
            self._round_requested = True  # every lease and place in line, re-asserted first
            if changed:
                self._acquire_after = time.monotonic() + self.grace
                self._round_after_grace = True
                self._server += 1
        if changed:
            logger.warning(
                "celery-throttled: the limiter's Redis at %s is a new server (restarted or "
                "failed over): running leases are put back first, new slots wait %.1f s",
                self.outage.where,
                self.grace,
            )
        return changed

    def _stale(self, batch: Batch) -> bool:
        """Whether ``batch`` was made before a new server was found (its round may renew
        waiters, its acquires were not held back): it must not be sent."""
        return batch.server != self._server

    def _failed(self, exc: BaseException) -> float:
        """Redis is unreachable: log it once; returns the seconds to wait before retrying."""
        self.outage.down(exc)
        delay = backoff(self._failures)
        self._failures += 1
        return delay

    def _recovered(self) -> None:
        self._failures = 0
        self.outage.up()
