"""What a lease transport reports: to its gate (:class:`Callbacks`), and to the log
(:class:`Outage`: one error per outage, one warning when it ends)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .leases import Acquire, Op, Outcome, Renew

__all__ = ["Callbacks", "Outage"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Callbacks:
    """What a transport reports to its gate (from any thread)."""

    #: the renewals to send: this worker's running and waiting holders, per key
    snapshot: Callable[[], list[Renew]]
    #: a slot was granted to one of this worker's holders: (key, holder, room), ``room`` the
    #: key's free slots after the grant when the reply says (an acquire's), else None
    granted: Callable[[str, str, int | None], None]
    #: leases of dead workers this worker reaped (report their tasks as lost)
    lost: Callable[[str, list[str]], None]
    #: an acquire was not granted at once: the holder waits
    waiting: Callable[[str, str], None]
    #: an errgroup was cancelled somewhere in the cluster (its id)
    group_cancelled: Callable[[str], None] = lambda gid: None
    #: a key's first waiter is blocked only by time: run the key's grant again (a Renew) at
    #: ``at_ms``; (key, at_ms, now_ms), both in Redis time
    wake: Callable[[str, int, int], None] = lambda key, at_ms, now_ms: None

    def deliver(self, op: Op, outcome: Outcome) -> None:
        """Report what one operation did, whichever transport carried it."""
        if outcome.restored:
            logger.warning(
                "celery-throttled: %d lease(s) of key %r had vanished from Redis and were put "
                "back (Redis restarted or lost data, or this worker stalled)",
                len(outcome.restored),
                outcome.key,
            )
        if outcome.reaped:
            self.lost(outcome.key, outcome.reaped)
        for holder in outcome.granted:
            self.granted(outcome.key, holder, outcome.room)
        if isinstance(op, Acquire) and op.holder not in outcome.granted:
            self.waiting(op.key, op.holder)
        if outcome.wake_at is not None and outcome.clock is not None:
            self.wake(outcome.key, outcome.wake_at, outcome.clock)

    def message(self, data: bytes | str) -> None:
        """A pub/sub message: a grant ``[key, holder]``, an errgroup's ``{"cancel": id}``, or a
        wake-up ``{"wake": key, "at": ms, "now": ms}`` claimed for this worker by a release
        its pool process made."""
        try:
            decoded = json.loads(data)
            if isinstance(decoded, dict) and "wake" in decoded:
                wake = (str(decoded["wake"]), int(decoded["at"]), int(decoded["now"]))
            elif isinstance(decoded, dict):
                gid = decoded["cancel"]
            else:
                key, holder = decoded
        except (ValueError, TypeError, KeyError):
            logger.error("celery-throttled: ignoring malformed limiter message %r", data)
            return
        if isinstance(decoded, dict) and "wake" in decoded:
            self.wake(*wake)
        elif isinstance(decoded, dict):
            self.group_cancelled(str(gid))
        else:
            self.granted(key, holder, None)


class Outage:
    """One error when the limiter's Redis goes away, one warning when it is back."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.since: float | None = None
        self._lock = threading.Lock()

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def down(self, exc: BaseException) -> None:
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                logger.error(
                    "celery-throttled: the limiter's Redis at %s is unreachable (%s); throttled "
                    "tasks wait until it is back, unthrottled tasks keep running",
                    self.where,
                    exc,
                )

    def up(self) -> None:
        with self._lock:
            if self.since is not None:
                logger.warning(
                    "celery-throttled: the limiter's Redis at %s is reachable again after %.1f s",
                    self.where,
                    time.monotonic() - self.since,
                )
                self.since = None
