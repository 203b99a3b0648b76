"""A run's outcome reported to its key's adaptive cap, from where the task ran.

:func:`report` is called by :func:`.execution.run` as the body ends, before the result is
stored and before the slot is freed, so the cap has moved by the time the next task of the key
is admitted. It runs ``lua/adapt.lua`` once: the outcome (``ok``, ``overloaded``, ``slowdown``
with its Retry-After; see :func:`~..adaptive.signal`), the body's latency, and how many bodies
of the key ran as this one started. That count comes from :func:`started`, called just before
the body (``lua/body.lua``: one round trip): a success grows the cap only when the run started
beside a whole cap of running bodies, since holders admitted but not yet running, which under
load are many, say nothing of what the downstream can take. A task without an adaptive cap, or
one that never went through the gate (eager), reports nothing; an ordinary failure reports
nothing either (its body only leaves the count). A Redis error here costs the cap one sample,
never the task: it is logged once per outage and the run goes on.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.exceptions import Retry

from .. import request as protocol
from ..adaptive import signal
from ..keys import Family, family_key
from ..settings import process_client
from ..transport.scripts import read_script

__all__ = ["report", "started"]

logger = logging.getLogger(__name__)

_ADAPT = read_script("adapt.lua")
_BODY = read_script("body.lua")
_failing = False


def _adaptive_run(task: Any, request: Any) -> tuple[Any, str, str] | None:
    """``(adaptive, family key, holder)`` of a run of an adaptive key that went through the
    gate; None for any other run."""
    admission = getattr(task, "throttle_admission", None)
    if admission is None or admission.adaptive is None:
        return None
    info = protocol.info(request)
    key, leases = info.get("key"), info.get("leases")
    if not isinstance(key, str) or not leases:
        return None
    return admission.adaptive, family_key(admission.family, key), str(leases[0][1])


def started(task: Any, request: Any) -> None:
    """The body of a run of an adaptive key starts: it counts among the key's running bodies
    (``lua/body.lua``) until it reports, and learns how many ran as it started."""
    run = _adaptive_run(task, request)
    if run is None:
        return
    _, key, holder = run
    try:
        client, settings = process_client(task.app)
        family = Family.of(settings.key_prefix, key)
        ttl_ms = int(settings.lease_ttl * 1000)
        protocol.info(request)["bodies"] = int(_BODY.run(client, [family.bodies], [holder, ttl_ms]))
    except redis.RedisError as error:
        _told_failed(key, error)


def report(task: Any, request: Any, exc: BaseException | None, latency: float) -> None:
    """Tell ``task``'s adaptive cap how this run ended (``exc``: what the body raised)."""
    run = _adaptive_run(task, request)
    if run is None:
        return
    adaptive, key, holder = run
    told: tuple[str, float] | None
    if isinstance(exc, Retry):  # a RetryPolicy retrying what the body raised
        cause = exc.exc if isinstance(exc.exc, BaseException) else None
        told = None if cause is None else signal(adaptive, cause)
    else:
        told = signal(adaptive, exc)
    seen = protocol.info(request).get("bodies")
    if told is None and seen is None:
        return
    global _failing
    try:
        client, settings = process_client(task.app)
        family = Family.of(settings.key_prefix, key)
        if told is None:  # an ordinary failure says nothing; the body still leaves the count
            client.zrem(family.bodies, holder)
        else:
            outcome, retry_after = told
            keys = [family.holders, family.waiters, family.meta, family.bodies]
            args: list[str | int] = [outcome, int(latency * 1000), int(retry_after * 1000)]
            args += [-1 if seen is None else int(seen), holder]
            _ADAPT.run(client, keys, args)
    except redis.RedisError as error:
        _told_failed(key, error)
    else:
        _failing = False


def _told_failed(key: str, error: redis.RedisError) -> None:
    """Logged once per outage: the cap loses a sample, never the task."""
    global _failing
    if not _failing:
        logger.warning("celery-throttled: adaptive cap of %r not told (%s)", key, error)
    _failing = True
