"""Backpressure at submit: ``max_pending`` tasks per key, refused in ``apply_async``.

A key's pending tasks are a sorted set in Redis (``keys.Family.pending``): member task id,
score = the time it stops counting. Nothing is trusted to remove an entry::

    submit      lua/submit.lua: expired entries leave; refused when max_pending remain;
                else the task counts until now + throttle_pending_ttl (+ its countdown)
    held, run   the worker holding or running it vouches for it at every lease renewal
                (lua/admission.lua, flow_vouch): it counts for another throttle_pending_ttl,
                and counts again if it had lapsed (its message redelivered after a crash)
    done        its release removes it at once (done, failed, rejected; not retried)
    anything    revoked, expired, purged, message lost, worker killed: nobody vouches any
    else        more, and it leaves the count throttle_pending_ttl after the last vouch

So the count can lag behind the truth by at most ``throttle_pending_ttl`` on the side of
refusing, never drift: an id counts once (a retry re-sends the same id), and every entry has a
time past which it is gone. A task sent by name (``send_task``) is not counted.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .errors import Backpressure, KeyFunctionError
from .keys import Family, family_key
from .settings import process_client
from .transport.scripts import read_script

__all__ = ["admit"]

_SUBMIT = read_script("submit.lua")


def admit(task: Any, args: Any, kwargs: Any, task_id: str, options: dict[str, Any]) -> None:
    """Count ``task_id`` as pending for its key, or raise :class:`Backpressure`.

    A key function that fails is left for the worker to report (the task is sent, uncounted).
    """
    admission = task.throttle_admission
    try:
        key = task.throttle_key_for(args, kwargs)
    except KeyFunctionError:
        return
    name = family_key(admission.family, key)
    client, settings = process_client(task._get_app())
    family = Family.of(settings.key_prefix, name)
    horizon = settings.pending_ttl + _delay(options)
    keys = [family.pending, family.meta]
    args_ = [task_id, admission.max_pending, int(horizon * 1000)]
    admitted, pending = _SUBMIT.run(client, keys, args_)
    if not int(admitted):
        raise Backpressure(str(task.name), key, int(pending), int(admission.max_pending))


def _delay(options: dict[str, Any]) -> float:
    """Seconds until the task may run (its countdown or eta), 0 when it may run now."""
    countdown = options.get("countdown")
    if isinstance(countdown, (int, float)) and not isinstance(countdown, bool):
        return max(0.0, float(countdown))
    eta = options.get("eta")
    if isinstance(eta, str):
        try:
            eta = datetime.fromisoformat(eta)
        except ValueError:
            return 0.0
    if isinstance(eta, datetime):
        now = datetime.now(eta.tzinfo or timezone.utc) if eta.tzinfo else datetime.now()
        return max(0.0, (eta - now).total_seconds())
    return 0.0
