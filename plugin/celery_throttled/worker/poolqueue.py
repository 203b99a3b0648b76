"""Granted requests go ahead in the pool's queue; the pool's kind, as the envelope names it.

When every pool process is busy, Celery queues requests in the worker's semaphore, first come
first served; a granted request waiting there would keep its cluster-wide slot idle while
unthrottled work runs. It moves behind the other slot holders, ahead of the rest. This reorders
the private ``_waiting`` list of kombu's ``LaxBoundedSemaphore``; when there is none, nothing
happens. (Writing it to the process at once when one comes free, as :func:`write_now` does for a
hand-off, was measured slower in P3: 1.27-1.28 against 1.18-1.19 of makespan / ideal.)
"""

from __future__ import annotations

from typing import Any

from .. import request as protocol

__all__ = ["jump", "kind", "write_now"]


def jump(consumer: Any, req: Any) -> None:
    """``req`` (just dispatched, holding a slot) goes ahead of the requests without one."""
    semaphore = getattr(consumer.controller, "semaphore", None)
    waiting = getattr(semaphore, "_waiting", None)
    if not waiting:
        return
    entry = waiting[-1]
    if len(entry) < 2 or not entry[1] or entry[1][0] is not req:
        return
    waiting.pop()
    position = 0
    while position < len(waiting) and _holds_slot(waiting[position]):
        position += 1
    waiting.insert(position, entry)


def write_now(consumer: Any) -> None:
    """Write what the prefork pool has queued for its processes now, not on the event loop's
    next turn: a request granted after a wait reaches an idle pool process in the same pass as
    its grant. (Requests granted at once are left to the loop: written one by one as they come,
    a burst of them would cost a process wake-up each.)

    Celery's event loop writes a job when a process's pipe is next reported writable (it
    registers the pipes on its next turn, then polls); this calls the same writer Celery
    registered (``hub.consolidate_callback``) on the pipes no write is under way on, which
    writes what it can and leaves the rest to the loop. Pools other than prefork's: nothing.
    """
    pool: Any = getattr(getattr(consumer, "pool", None), "_pool", None)
    outbound = getattr(pool, "outbound_buffer", None)
    writer = getattr(getattr(consumer, "hub", None), "consolidate_callback", None)
    if not outbound or writer is None:
        return
    idle = [fd for fd in pool._all_inqueues if fd not in pool._active_writes]
    if idle:
        writer(idle)


def kind(pool: Any) -> str:
    """``prefork``, ``threads``, ``solo``…: the name of the worker's pool."""
    module = type(pool).__module__.rsplit(".", 1)[-1]
    return {"thread": "threads"}.get(module, module)


def _holds_slot(entry: Any) -> bool:
    args: tuple[Any, ...] = entry[1] if len(entry) > 1 else ()
    return bool(args) and protocol.SLOT.get(args[0])
