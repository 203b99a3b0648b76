"""A parked request as Celery sees it: its job, its callbacks, and the revoke command.

:mod:`.parking` decides which waiter to park and when; this module does the Celery side. The
request's job goes to the pool as :func:`..pool.parking.run_parked` wrapped around Celery's
tracer, with the same arguments and callbacks Celery's own ``execute_using_pool`` would pass
(and no time limits: a parked request has none). Its callbacks tell parking how the job came
back: unrun (``UNPARKED``), run, or lost with its process. Celery's ``on_accepted`` (the message
acknowledged, the task counted active, ``task-started`` sent) is held back until the grant.
Every hook is set on the request instance (where ``execute_using_pool`` and the pool look them
up) and removed when the job comes back unrun, so a later dispatch is Celery's own.
"""

from __future__ import annotations

import time
from typing import Any
from weakref import ref

from celery.app.trace import fast_trace_task, trace_task_ret
from celery.exceptions import TaskRevokedError
from celery.utils.functional import maybe
from celery.worker import control

from .. import request as protocol
from ..pool.parking import is_unparked, run_parked
from .endpaths import hook_end_paths
from .lines import Held

__all__ = ["accepted", "hook_revoke", "send", "unhook"]

#: the request's attributes set on the instance, removed when its job comes back unrun
_HOOKS = (
    "execute_using_pool",
    "on_accepted",
    "on_success",
    "on_failure",
    "on_timeout",
    "_announce_revoked",
    "_announce_cancelled",
)


def send(parking: Any, held: Held, park: dict[str, Any]) -> None:
    """Hook ``held``'s request for its park (``park``: what :func:`run_parked` needs), then
    dispatch it through the gate, as any request."""
    req = held.req
    hook_end_paths(req, lambda outcome, later: parking.ended(held, outcome, later))
    on_success, on_failure = req.on_success, req.on_failure

    def execute_using_pool(pool: Any, **kwargs: Any) -> Any:
        if req.revoked():
            raise TaskRevokedError(req.id)
        trace = fast_trace_task if req._app.use_fast_trace_task else trace_task_ret
        args = (req.type, req.id, req.request_dict, req.body)
        result = pool.apply_async(
            run_parked,
            args=(trace, park, *args, req.content_type, req.content_encoding),
            accept_callback=req.on_accepted,
            timeout_callback=req.on_timeout,
            callback=req.on_success,
            error_callback=req.on_failure,
            correlation_id=req.id,
        )
        req._apply_result = maybe(ref, result)
        return result

    def on_accepted(pid: int, time_accepted: float) -> None:
        spot = held.park
        if spot is None or spot.started:
            type(req).on_accepted(req, pid, time_accepted)
        else:
            spot.accepted = pid

    def on_success_parked(reply: Any, **kwargs: Any) -> Any:
        if is_unparked(reply):
            return parking.came_back(held)
        parking.ran(held)
        return on_success(reply, **kwargs)

    def on_failure_parked(exc_info: Any, *args: Any, **kwargs: Any) -> Any:
        if held.park is not None and not parking.ran_before_loss(held):
            return parking.came_back(held)
        parking.ran(held)
        return on_failure(exc_info, *args, **kwargs)

    req.execute_using_pool = execute_using_pool
    req.on_accepted = on_accepted
    req.on_success = on_success_parked
    req.on_failure = on_failure_parked
    protocol.ADMITTED.set(req, True)
    parking.gate.dispatch(req)


def unhook(held: Held) -> None:
    """The job came back unrun: the request is Celery's own again."""
    for name in _HOOKS:
        held.req.__dict__.pop(name, None)


def accepted(held: Held) -> None:
    """The grant came: Celery hears now that the pool process took the job."""
    spot = held.park
    if spot is not None and spot.accepted is not None:
        type(held.req).on_accepted(held.req, spot.accepted, time.monotonic())


def hook_revoke() -> None:
    """Celery's ``revoke`` control command tells the worker's parking at once: a parked request
    skips the checks its worker makes as it admits a request, so the revocation must reach it
    before its grant can. (``revoke_by_stamped_headers`` reaches it through the sweep.)
    Installed once per process, in the handler table kombu's mailbox reads at each command."""
    original = control.Panel.data.get("revoke")
    if original is None or getattr(original, "throttle_parking", False):
        return

    def revoke(state: Any, task_id: Any, *args: Any, **kwargs: Any) -> Any:
        reply = original(state, task_id, *args, **kwargs)
        gate = protocol.GATE.get(getattr(state, "consumer", None))
        if gate is not None:
            ids = {task_id} if isinstance(task_id, str) else set(task_id or ())
            gate.parking.revoked(ids)
        return reply

    revoke.throttle_parking = True  # type: ignore[attr-defined]
    control.Panel.data["revoke"] = revoke
