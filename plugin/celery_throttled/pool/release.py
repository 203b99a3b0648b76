"""The slot freed where the body ran, the moment it ends.

Celery stores a task's result and pipes it back to the worker's main process before that process
hears of the end; a slot released only then stays idle for that long. So the process (pool
process, pool thread, or the solo main thread) that ran a throttled body releases its leases
itself, straight after the body, before the result is stored::

    body ends -> ending listeners, in order -> release.lua, ending=1  (the slot is free here)
              -> Celery stores the result, pipes it back
              -> the main process's end path releases again, with its next acquire or renewal
                 of the key: a no-op for a freed lease

Why that cannot free a slot twice, nor bring one back: ``release.lua`` removes the holder only if
it holds the slot (a second release of it frees nothing) and records it in the key's *ended*
set (``keys.Family.ended``) for one lease TTL; ``renew.lua`` skips a running holder found there,
so a renewal from the main process, which still counts the task as running until its end path
runs, neither extends nor restores the lease. The main process's release stays as the safety net
for a pool process lost before it could release, or a release that failed here.

:data:`ending` listeners run first, in the order they were added, with ``(task, request,
outcome)``: whatever must happen while the slot is still held (the test probe records the body's
end there; a step that reports the run's outcome belongs there too). A listener's failure is
logged, never raised into the task.

As the worker's main process then learns of the end from Celery (``on_success``), its own
release rides in the next acquire of the key, else in its renewal of the next round
(:mod:`..transport.ended`), off the hand-off's path and with no script call of its own; every
other end (a lost pool process, a hard time limit, a revocation) releases from there at once.

A request the gate marked ``deferred`` (its cap was far from binding as it was granted:
:meth:`..worker.lines.Held.far_from_binding`) is not released here: nobody waits for its slot,
and the worker's own release, which rides in its next acquire of the key, frees it for one
script call per task instead of two.

The leases a run holds reach it in the request's ``throttle`` header (``request.info()["leases"]``,
set by the gate as it admits the request): ``[key, holder, spec]`` each, the task's own slot
first, then an errgroup's. Grants are published to the waiters' workers (this process is no
worker: the release runs with an empty caller), and expired leases are left for a worker's next
script on the key, which reports their tasks as lost (this process could not). When Redis
cannot be reached from here, nothing waits: the main process releases as before, and this
process tries again only after a pause.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import request as protocol
from ..settings import Settings
from ..transport.leases import RedisLeases, Release

__all__ = ["Ending", "ending", "free"]

logger = logging.getLogger(__name__)

#: ``listener(task, request, outcome)``, called as a throttled body ends, before its slot is
#: freed; ``outcome`` is "done", "failed" or "retried"
Ending = Callable[[Any, Any, str], None]
ending: list[Ending] = []

#: after a failed release, the seconds this process leaves releases to the main process
PAUSE = 5.0

_lock = threading.Lock()
_stores: dict[tuple[int, int], RedisLeases] = {}
_paused_until = 0.0


def free(task: Any, request: Any, outcome: str, ran: bool = True) -> None:
    """The body of ``task`` ended with ``outcome``: tell the listeners, then free its slots
    (without telling them when it never ran: a guard stopped it)."""
    for listener in ending if ran else ():
        try:
            listener(task, request, outcome)
        except Exception:
            logger.exception("celery-throttled: an ending listener failed for task %s", request.id)
    info = protocol.info(request)
    leases = info.get("leases")
    if not leases or info.get("deferred") or time.monotonic() < _paused_until:
        return
    waited = info.get("waited")
    ops = [
        Release(key, holder, 0, outcome, waited, spec=spec, ending=True)
        for key, holder, spec in leases
    ]
    try:
        _store(task.app).execute(ops)
    except Exception as exc:  # the main process releases them (the safety net)
        _pause(exc)


def _store(app: Any) -> RedisLeases:
    """This process's limiter client for ``app`` (a forked pool process makes its own)."""
    ident = (os.getpid(), id(app))
    store = _stores.get(ident)
    if store is None:
        with _lock:
            store = _stores.get(ident)
            if store is None:
                settings = Settings.from_app(app)
                client = settings.client(socket_timeout=1, socket_connect_timeout=1)
                store = RedisLeases(client, settings.key_prefix, settings.lease_ttl, worker="")
                for inherited in [i for i in _stores if i[0] != ident[0]]:
                    del _stores[inherited]  # a forked process's copies are of no use to it
                _stores[ident] = store
    return store


def _pause(exc: BaseException) -> None:
    global _paused_until
    _paused_until = time.monotonic() + PAUSE
    logger.warning(
        "celery-throttled: a pool process could not release its slot (%s); the worker releases "
        "it, and this process leaves it to the worker for %.0f s",
        exc,
        PAUSE,
    )
