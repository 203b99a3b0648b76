"""Granted requests go ahead in the pool's queue; the pool's kind, as the envelope names it.

When every pool process is busy, Celery queues requests in the worker's semaphore, first come
first served; a granted request waiting there would keep its cluster-wide slot idle while
unthrottled work runs. It moves behind the other slot holders, ahead of the rest. This reorders
the private ``_waiting`` list of kombu's ``LaxBoundedSemaphore``; when there is none, nothing
happens.
"""

from __future__ import annotations

from typing import Any

from .. import request as protocol

__all__ = ["jump", "kind"]


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


def kind(pool: Any) -> str:
    """``prefork``, ``threads``, ``solo``…: the name of the worker's pool."""
    module = type(pool).__module__.rsplit(".", 1)[-1]
    return {"thread": "threads"}.get(module, module)


def _holds_slot(entry: Any) -> bool:
    args: tuple[Any, ...] = entry[1] if len(entry) > 1 else ()
    return bool(args) and protocol.SLOT.get(args[0])
