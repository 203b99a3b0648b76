"""How a failure travels through an errgroup, and down to the errgroups its members started.

:func:`settled` listens to every envelope written (:mod:`..pool.backend`), so it runs wherever
a member settles: a pool process, a worker's main process, or the worker that reports a lost
one. :func:`guard` is asked before each run where the task runs (:mod:`..pool.execution`).
Both are registered in :mod:`celery_throttled.errgroup`.

* A member settles: the group counts it. The first envelope that is not ok cancels the group;
  this caller writes "cancelled" envelopes for the members that will now never start, sends
  the errback, and cancels the errgroups started inside the members that are running.
* The last member settles: if every one was ok, this caller sends the body with the values in
  member order.
* A throttled task that is not ok cancels the errgroups it started (a Go context cancelled by
  its parent).

Every step tolerates a second report of the same member (the script counts each once), so the
errback and the body are sent exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from celery import signature
from celery.exceptions import Ignore

from .. import request as protocol
from ..context import TaskContext
from ..envelope import ErrorInfo, dotted_name
from ..errors import Cancelled, TaskFailed
from ..pool.backend import envelope_backend
from ..results import envelope_from_meta
from .store import ALREADY_SETTLED, CANCELLED, STARTED, UNKNOWN, store_for

__all__ = [
    "cancel_group",
    "guard",
    "member_settled",
    "never_ran",
    "probe",
    "settled",
    "start_member",
    "task_failed",
    "write_cancelled",
]

logger = logging.getLogger(__name__)

#: how often a running member asks Redis whether its group was cancelled, at most
PROBE_INTERVAL = 0.05


def settled(app: Any, request: Any, task_id: str, ok: bool) -> None:
    """An envelope was written: count an errgroup member, and a throttled task that did not
    succeed cancels the errgroups it started."""
    group = protocol.group(request)
    if group is not None:
        member_settled(app, group, task_id, ok)
    if not ok and protocol.info(request):
        task_failed(app, task_id)


def guard(task: Any, request: Any, ctx: TaskContext) -> None:
    """Before a member runs: record its start, unless its group was cancelled first."""
    group = protocol.group(request)
    if group is None:
        return
    answer = start_member(task.app, group, request.id)
    if answer == ALREADY_SETTLED:
        raise Ignore()  # its group was cancelled and its "cancelled" envelope written
    if answer == CANCELLED:
        error = never_ran(task.name, request.id, group["id"], "before it started")
        raise TaskFailed(error.to_json())
    ctx._cancel_probe = probe(task.app, group["id"])


def never_ran(task_name: str | None, task_id: str | None, gid: str, reason: str) -> ErrorInfo:
    """The error of a member that will never run: its group was cancelled."""
    return ErrorInfo(
        "cancelled",
        dotted_name(Cancelled),
        f"task {task_name}[{task_id}] never ran: its errgroup {gid} was cancelled ({reason})",
    )


def member_settled(app: Any, group: dict[str, Any], task_id: str, ok: bool) -> None:
    """A member's envelope is written: count it, and act on what that decided."""
    store = store_for(app)
    gid = group["id"]
    outcome = store.settle(gid, task_id, ok, f"member {task_id} did not succeed")
    if not outcome.counted:
        return
    if outcome.cancelled_now:
        logger.info(
            "celery-throttled: errgroup %s cancelled: member %s did not succeed", gid, task_id
        )
        _after_cancel(app, gid, outcome.victims, f"member {task_id} did not succeed")
    if outcome.errback is not None:
        _send(app, outcome.errback, (_envelope_json(app, task_id),), f"errback of {gid}")
    if outcome.body is not None:
        backend = envelope_backend(app)
        values = [backend.get_task_meta(member).get("result") for member in store.members(gid)]
        _send(app, outcome.body, (values,), f"body of {gid}")


def cancel_group(app: Any, gid: str, reason: str) -> bool:
    """Cancel an errgroup; False when it was already cancelled or is unknown."""
    status, victims = store_for(app).cancel(gid, reason)
    if status != 1:
        return False
    logger.info("celery-throttled: errgroup %s cancelled: %s", gid, reason)
    _after_cancel(app, gid, victims, reason)
    return True


def task_failed(app: Any, task_id: str) -> None:
    """A throttled task did not succeed: cancel the errgroups it started."""
    store = store_for(app)
    for child in store.children_of(task_id):
        cancel_group(app, child, f"task {task_id}, which started it, did not succeed")


def start_member(app: Any, group: dict[str, Any], task_id: str) -> int:
    """A member begins to run: record it, unless its group was cancelled first.

    Returns :data:`.store.STARTED` (run it), ``ALREADY_SETTLED`` (do not run, write
    nothing) or ``CANCELLED`` (do not run; settle it as cancelled). Without Redis, or for a
    group Redis no longer knows, it runs (with a warning).
    """
    gid = group["id"]
    try:
        answer = store_for(app).start(gid, task_id)
    except Exception as exc:
        logger.warning(
            "celery-throttled: cannot record the start of %s in errgroup %s (%s); it runs",
            task_id,
            gid,
            exc,
        )
        return STARTED
    if answer == UNKNOWN:
        logger.warning(
            "celery-throttled: task %s belongs to errgroup %s, which Redis no longer knows "
            "(throttle_errgroup_ttl passed?); it runs untracked",
            task_id,
            gid,
        )
        return STARTED
    return answer


def probe(app: Any, gid: str) -> Callable[[], bool]:
    """``current_context().cancelled`` for a member: asks Redis at most every 50 ms."""
    store = store_for(app)
    last = [0.0]

    def cancelled() -> bool:
        now = time.monotonic()
        if now - last[0] < PROBE_INTERVAL:
            return False
        last[0] = now
        try:
            return store.cancelled(gid)
        except Exception:  # Redis away: not cancelled as far as anyone knows
            logger.warning("celery-throttled: cannot reach Redis to check errgroup %s", gid)
            return False

    return cancelled


def write_cancelled(
    app: Any, group: dict[str, Any], task_id: str, task_name: str | None, reason: str
) -> None:
    """Settle a member that will never run as "cancelled"."""
    error = never_ran(task_name, task_id, group["id"], reason)
    request = protocol.context(task_id, task=task_name, group=group)
    envelope_backend(app).mark_as_failure(task_id, TaskFailed(error.to_json()), request=request)


def _after_cancel(app: Any, gid: str, victims: list[str], reason: str) -> None:
    store = store_for(app)
    state = store.state(gid)
    group = {"id": gid, "terminate": state.get("terminate") == "1"}
    if victims:
        names = dict(zip(store.members(gid), json.loads(state.get("names", "[]")), strict=False))
        for task_id in victims:
            try:
                write_cancelled(app, group, task_id, names.get(task_id), reason)
            except Exception:
                logger.exception("celery-throttled: could not settle %s as cancelled", task_id)
    for member in store.started(gid):
        for child in store.children_of(member):
            cancel_group(app, child, f"its parent errgroup {gid} was cancelled")


def _send(app: Any, sig: dict[str, Any], args: tuple[Any, ...], what: str) -> None:
    try:
        signature(sig, app=app).apply_async(args)
    except Exception:
        logger.exception("celery-throttled: could not send the %s", what)


def _envelope_json(app: Any, task_id: str) -> dict[str, Any]:
    meta = envelope_backend(app).get_task_meta(task_id)
    return envelope_from_meta(meta, task_id, None).to_json()
