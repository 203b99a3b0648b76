"""The worker's side of errgroups: members it holds in line, and members running in its pool.

A member whose group was cancelled must not start. The gate asks :meth:`Members.may_start`
before it admits one (and the member asks Redis again as it begins to run, see
:func:`.flow.guard`); a cancellation message drops the group's waiting members at once and, with
``terminate=True`` on prefork, stops the running ones; the sweep catches missed messages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import redis
from celery.worker import state as worker_state

from .. import request as protocol
from .flow import write_cancelled
from .store import GroupStore

__all__ = ["Members"]

logger = logging.getLogger(__name__)


class Waiter(Protocol):
    """A request the worker holds in line (the gate's ``Held``)."""

    req: Any


class Members:
    """Errgroup members on one worker; ``drop(held)`` takes a waiter out of the gate's line."""

    def __init__(
        self,
        app: Any,
        store: GroupStore,
        consumer: Any,
        pool_kind: str,
        drop: Callable[[Any], None],
    ) -> None:
        self.app = app
        self.store = store
        self.consumer = consumer
        self.pool_kind = pool_kind
        self.drop = drop

    def may_start(self, req: Any, held: Waiter | None) -> bool:
        """False (and the request dropped) for a member whose group was cancelled.

        Its "cancelled" envelope is written by whoever cancelled the group; written here too if
        it is not yet (the canceller may have died).
        """
        group = protocol.group(req)
        if group is None:
            return True
        try:
            cancelled, settled = self.store.peek(group["id"], req.id)
        except redis.RedisError:
            return True  # its run checks again
        if not cancelled:
            return True
        if held is not None:
            self.drop(held)
        if not settled:
            write_cancelled(self.app, group, req.id, req.name, "before it started")
        worker_state.task_ready(req)
        req.acknowledge()
        return False

    def cancelled(self, gid: str, waiting: list[Any]) -> None:
        """Errgroup ``gid`` was cancelled: drop its waiting members here, and stop its running
        ones where the pool can (``terminate=True`` on prefork)."""
        for held in waiting:
            if _group_id(held.req) == gid:
                self.may_start(held.req, held)
        if self.pool_kind != "prefork":
            return  # threads cannot be stopped: they see current_context().cancelled
        running = [
            req
            for req in list(worker_state.active_requests)
            if protocol.ADMITTED.get(req)
            and req.time_start
            and (group := protocol.group(req)) is not None
            and group["id"] == gid
            and group.get("terminate")
        ]
        try:  # the member that failed (and any that just ended) must keep its own envelope
            ended = self.store.settled_among(gid, [req.id for req in running])
        except redis.RedisError:
            return
        for req in running:
            if req.id in ended:
                continue
            logger.info(
                "celery-throttled: stopping %s[%s]: its errgroup %s was cancelled",
                req.name,
                req.id,
                gid,
            )
            protocol.CANCELLED.set(
                req._context,
                f"task {req.name}[{req.id}] was stopped: its errgroup {gid} was cancelled",
            )
            req.terminate(self.consumer.pool, signal="SIGTERM")

    def keep_live(self, waiting: list[Any]) -> list[Any]:
        """The sweep's check for missed cancellation messages: drops the members of cancelled
        groups, returns the other waiters."""
        gids = sorted({gid for held in waiting if (gid := _group_id(held.req)) is not None})
        if not gids:
            return waiting
        try:
            cancelled = self.store.cancelled_among(gids)
        except redis.RedisError:
            return waiting
        keep = []
        for held in waiting:
            if _group_id(held.req) in cancelled:
                self.may_start(held.req, held)
            else:
                keep.append(held)
        return keep


def _group_id(req: Any) -> str | None:
    group = protocol.group(req)
    return None if group is None else str(group["id"])
