"""Outcomes the worker's main process decides itself, for tasks that will not run (or that
died): a bad key, a passed deadline, a wait policy's refusal, a lost worker.

Each is written as an envelope through the task's backend, the message is acknowledged and the
request leaves the worker's bookkeeping, so nothing submitted is silently lost.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import states
from celery.worker import state as worker_state

from .. import request as protocol
from ..envelope import ErrorInfo, dotted_name
from ..errgroup.store import store_for
from ..errors import DeadlineExceeded, Rejected, TaskFailed
from ..keys import node_of, task_of
from ..pool.backend import envelope_backend

__all__ = ["deadline_passed", "never_runs", "rejected", "report_lost", "report_lost_soon"]

logger = logging.getLogger(__name__)


def never_runs(req: Any, exc: Exception) -> None:
    """Record a failure for a request that will not run, and let its message go."""
    try:
        req.task.backend.mark_as_failure(
            req.id,
            exc,
            request=req._context,
            store_result=req.store_errors,
        )
    finally:
        worker_state.task_ready(req)
        req.send_event("task-failed", exception=repr(exc))
        req.acknowledge()


def deadline_passed(req: Any, where: str) -> None:
    error = ErrorInfo(
        "deadline",
        dotted_name(DeadlineExceeded),
        f"task {req.name}[{req.id}] passed its deadline {where}; it did not run",
    )
    logger.info("celery-throttled: %s", error.message)
    never_runs(req, TaskFailed(error.to_json()))


def rejected(req: Any, reason: str) -> None:
    error = ErrorInfo(
        "rejected", dotted_name(Rejected), f"task {req.name}[{req.id}] was rejected: {reason}"
    )
    logger.info("celery-throttled: %s", error.message)
    never_runs(req, TaskFailed(error.to_json()))


def report_lost_soon(app: Any, key: str, holders: list[str], running: set[str]) -> None:
    """:func:`report_lost` on a thread of its own (it reads and writes the result backend),
    for the ``holders`` not ``running`` here."""
    holders = [h for h in holders if h not in running]
    if not holders:
        return
    threading.Thread(
        target=report_lost, args=(app, key, holders), name="throttle-lost", daemon=True
    ).start()


def report_lost(app: Any, key: str, holders: list[str]) -> None:
    """Each task whose lease of ``key`` expired and that has no envelope yet gets a
    ``worker_lost`` one."""
    backend = envelope_backend(app)
    for holder in holders:
        task_id, worker = task_of(holder), node_of(holder)
        try:
            if backend.get_task_meta(task_id).get("status") in states.READY_STATES:
                continue
            logger.warning(
                "celery-throttled: task %s held a slot of %r on worker %s, which stopped renewing "
                "its lease: reporting it as worker_lost",
                task_id,
                key,
                worker,
            )
            gid = store_for(app).group_of(task_id)  # an errgroup member counts for its group
            request = protocol.context(
                task_id,
                hostname=worker,
                throttle={"key": key},
                group=None if gid is None else {"id": gid},
            )
            exc = WorkerLostError(
                f"the worker running it ({worker}) stopped renewing its lease of "
                f"{key!r} and is presumed dead"
            )
            backend.mark_as_failure(task_id, exc, request=request)
        except Exception:
            logger.exception("celery-throttled: could not report task %s as lost", task_id)
