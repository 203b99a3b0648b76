"""How a failure travels through an errgroup, and down to the errgroups its members started.

Called where envelopes are written (:mod:`.results`), so it runs wherever a member settles:
a pool process, a worker's main process, or the worker that reports a lost one.

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
from celery.app.task import Context

from .envelope import ErrorInfo, dotted_name
from .errgroup_store import STARTED, UNKNOWN, store_for
from .errors import Cancelled, TaskFailed

__all__ = [
    "HEADER",
    "cancel_group",
    "group_of",
    "member_settled",
    "probe",
    "start_member",
    "task_failed",
    "write_cancelled",
]

logger = logging.getLogger(__name__)

#: the message header that makes a task an errgroup member: {"id", "limit", "terminate"}
HEADER = "throttle_group"
#: how often a running member asks Redis whether its group was cancelled, at most
PROBE_INTERVAL = 0.05


def group_of(request: Any) -> dict[str, Any] | None:
    """The errgroup header of a request (or task context), if it is a member."""
    group = getattr(request, HEADER, None)
    if group is None and isinstance(getattr(request, "_request_dict", None), dict):
        group = request._request_dict.get(HEADER)
    if isinstance(group, dict) and isinstance(group.get("id"), str):
        return group
    return None


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
        backend = _backend(app)
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

    Returns :data:`.errgroup_store.STARTED` (run it), ``ALREADY_SETTLED`` (do not run, write
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
    error = ErrorInfo(
        "cancelled",
        dotted_name(Cancelled),
        f"task {task_name}[{task_id}] never ran: its errgroup {group['id']} was cancelled "
        f"({reason})",
    )
    request = Context(id=task_id, task=task_name, **{HEADER: group})
    _backend(app).mark_as_failure(task_id, TaskFailed(error.to_json()), request=request)


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
    from .results import envelope_from_meta

    return envelope_from_meta(_backend(app).get_task_meta(task_id), task_id, None).to_json()


def _backend(app: Any) -> Any:
    from .results import envelope_backend

    return envelope_backend(app)
