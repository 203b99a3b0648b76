"""What both lease transports share: the interface the gate talks to, the callbacks through
which they report back, and the logic written once for both (outage reporting, the server's
identity after an outage, the key registry's reaping window).

A transport carries :class:`~.leases.Acquire`, :class:`~.leases.Release` and
:class:`~.leases.Renew` operations to Redis and reports what they did through
:class:`Callbacks`; it never decides anything about a request itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.cluster import RedisCluster

from .leases import Acquire, Op, Outcome, Renew

__all__ = [
    "REGISTRY_BATCH",
    "REGISTRY_RETENTION",
    "REGISTRY_WINDOW",
    "Callbacks",
    "Outage",
    "Transport",
    "foreign_keys",
    "report_restored",
    "server_identity",
]

logger = logging.getLogger(__name__)


class Transport(ABC):
    """How one worker's lease operations reach Redis, and grants come back.

    Fail closed: while Redis is unreachable operations wait (nothing is granted, so the cap
    holds) and the transport reconnects by itself.
    """

    #: how the worker's start-up log line names it
    name: str

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

    @abstractmethod
    def submit(self, op: Op) -> None:
        """Send ``op`` soon; its outcome comes back through the callbacks. Any thread."""

    @abstractmethod
    def register(self, key: str) -> None:
        """Put ``key`` in the key registry soon (so any worker can reap its leases)."""

    @abstractmethod
    def renew_soon(self) -> None:
        """Renew every lease and place in line now rather than at the next period."""


#: how far back the key registry is read for reaping, and how many keys at most per round
REGISTRY_WINDOW = 3600.0
REGISTRY_BATCH = 200
#: keys unused for this long leave the registry (per-value keys and errgroups' own limits
#: would otherwise pile up there)
REGISTRY_RETENTION = 7 * 86400.0


def foreign_keys(known: set[str], members: list[Any]) -> list[Renew]:
    """Reaping passes (cap unknown: 0) over registered keys this worker has nothing of."""
    keys = (m.decode() if isinstance(m, bytes) else str(m) for m in members)
    return [Renew(key, 0) for key in keys if key not in known]


@dataclass(frozen=True)
class Callbacks:
    """What a limiter (either transport) reports to its gate."""

    #: the renewals to send: this worker's running and waiting holders, per key
    snapshot: Callable[[], list[Renew]]
    #: a slot was granted to one of this worker's holders
    granted: Callable[[str, str], None]
    #: leases of dead workers this worker reaped (report their tasks as lost)
    lost: Callable[[str, list[str]], None]
    #: an acquire was not granted at once: the holder waits
    waiting: Callable[[str, str], None]
    #: an errgroup was cancelled somewhere in the cluster (its id)
    group_cancelled: Callable[[str], None] = lambda gid: None

    def deliver(self, op: Op, outcome: Outcome) -> None:
        """Report what one operation did, whichever transport carried it."""
        report_restored(outcome)
        if outcome.reaped:
            self.lost(outcome.key, outcome.reaped)
        for holder in outcome.granted:
            self.granted(outcome.key, holder)
        if isinstance(op, Acquire) and op.holder not in outcome.granted:
            self.waiting(op.key, op.holder)

    def message(self, data: bytes | str) -> None:
        """A pub/sub message: a grant ``[key, holder]`` or an errgroup's ``{"cancel": id}``."""
        try:
            decoded = json.loads(data)
            if isinstance(decoded, dict):
                gid = decoded["cancel"]
            else:
                key, holder = decoded
        except (ValueError, TypeError, KeyError):
            logger.error("celery-throttled: ignoring malformed limiter message %r", data)
            return
        if isinstance(decoded, dict):
            self.group_cancelled(str(gid))
        else:
            self.granted(key, holder)


def server_identity(client: Any) -> str:
    """The run id of the Redis behind ``client``; for a Cluster, of all its primaries (a
    restart or a failover of any one of them changes it)."""
    if isinstance(client, RedisCluster):
        infos = client.info("server", target_nodes=RedisCluster.PRIMARIES)
        if "run_id" in infos:  # a cluster of one primary
            return str(infos["run_id"])
        return ",".join(sorted(str(info.get("run_id")) for info in infos.values()))
    return str(client.info("server").get("run_id"))


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


def report_restored(outcome: Outcome) -> None:
    if outcome.restored:
        logger.warning(
            "celery-throttled: %d lease(s) of key %r had vanished from Redis and were put back "
            "(Redis restarted or lost data, or this worker stalled)",
            len(outcome.restored),
            outcome.key,
        )
