"""The sweep's policies: what becomes of a request that waits for a slot.

Every ``throttle_sweep_interval`` the gate puts each waiting request to :func:`judge`; the first
policy that applies decides, in this order:

1. revoked or expired: discarded as Celery would (``Request.revoked()`` acknowledges it);
2. its caller's deadline passed: it never runs, and settles as ``deadline``;
3. waited ``max_wait`` seconds: rejected (settles as ``rejected``);
4. held ``throttle_max_hold`` seconds: handed back to the broker, before the broker's own
   redelivery timeout could make it run twice.

(Members of cancelled errgroups are dropped before, by :mod:`celery_throttled.errgroup.members`.)
:func:`judge` decides; :func:`sweep` carries the verdicts out through the gate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from celery.worker import state as worker_state

from .. import deadlines
from . import outcomes
from .lines import Held

__all__ = ["DEADLINE", "DISCARD", "HAND_BACK", "REJECT", "Verdict", "carry_out", "judge", "sweep"]

logger = logging.getLogger(__name__)

DISCARD, DEADLINE, REJECT, HAND_BACK = "discard", "deadline", "reject", "hand back"


@dataclass(frozen=True)
class Verdict:
    action: str
    reason: str = ""


def judge(held: Held, now: float, max_hold: float) -> Verdict | None:
    """What to do with ``held`` now (``now``: monotonic), or None: it keeps waiting."""
    req = held.req
    if req.id in worker_state.revoked or worker_state.revoked_stamps or _expired(req):
        return Verdict(DISCARD) if req.revoked() else None
    if deadlines.passed(req):
        return Verdict(DEADLINE, f"while it waited for a slot of {held.key!r}")
    waited = now - held.since
    max_wait = req.task.throttle_max_wait
    if max_wait is not None and waited >= max_wait:
        reason = f"waited {waited:.1f}s for a slot of {held.key!r} (max_wait={max_wait})"
        return Verdict(REJECT, reason)
    if waited > max_hold:
        reason = (
            f"waited {time.monotonic() - held.since:.0f}s for a slot of {held.key!r}; handing "
            "it back to the broker (throttle_max_hold)"
        )
        return Verdict(HAND_BACK, reason)
    return None


def _expired(req: Any) -> bool:
    expires = req.expires
    if expires is None:
        return False
    now = datetime.now(timezone.utc if expires.tzinfo else None)
    return bool(now > expires)


def sweep(gate: Any) -> None:
    """Put every request ``gate`` holds waiting to the policies; carry out their verdicts."""
    now = time.monotonic()
    for held in gate.members.keep_live(gate.lines.waiting()):
        carry_out(gate, held, now)


def carry_out(gate: Any, held: Held, now: float) -> None:
    """Put ``held`` to the policies, and carry out the verdict. One parked in a pool process
    is called back to the worker first (:mod:`.parking`), and judged again as it comes back."""
    verdict = judge(held, now, gate.settings.max_hold)
    if verdict is None:
        return
    if held.park is not None:
        gate.parking.recall(held)
        return
    req = held.req
    if verdict.action == REJECT:
        gate.reject(held, verdict.reason)
        return
    gate.window.narrow(held)
    if verdict.action == HAND_BACK:
        logger.info("celery-throttled: %s[%s] %s", req.name, req.id, verdict.reason)
        gate.give_back(held, requeue=True)
        return
    gate.release(held)
    if verdict.action == DEADLINE:
        outcomes.deadline_passed(req, verdict.reason)
