"""A run's outcome reported to its key's adaptive cap, from where the task ran.

:func:`report` is called by :func:`.execution.run` as the body ends, before the result is
stored and before the slot is freed, so the cap has moved by the time the next task of the key
is admitted. It runs ``lua/adapt.lua`` once: the outcome (``ok``, ``overloaded``, ``slowdown``
with its Retry-After; see :func:`~..adaptive.signal`) and the body's latency. A task without an
adaptive cap, or one that never went through the gate (eager), reports nothing; an ordinary
failure reports nothing either. A Redis error here costs the cap one sample, never the task: it
is logged once per outage and the run goes on.
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
from ..transport.leases import read_script

__all__ = ["report"]

logger = logging.getLogger(__name__)

_ADAPT = read_script("adapt.lua")
_failing = False


def report(task: Any, request: Any, exc: BaseException | None, latency: float) -> None:
    """Tell ``task``'s adaptive cap how this run ended (``exc``: what the body raised)."""
    admission = getattr(task, "throttle_admission", None)
    if admission is None or admission.adaptive is None:
        return
    adaptive = admission.adaptive
    key = protocol.info(request).get("key")
    if not isinstance(key, str):
        return
    if isinstance(exc, Retry):  # a RetryPolicy retrying what the body raised
        exc = exc.exc if isinstance(exc.exc, BaseException) else None
        if exc is None:
            return
    told = signal(adaptive, exc)
    if told is None:
        return
    outcome, retry_after = told
    global _failing
    try:
        client, settings = process_client(task.app)
        family = Family.of(settings.key_prefix, family_key(admission.family, key))
        keys = [family.holders, family.waiters, family.meta]
        args: list[str | int] = [outcome, int(latency * 1000), int(retry_after * 1000)]
        _ADAPT.run(client, keys, args)
    except redis.RedisError as error:
        if not _failing:
            logger.warning("celery-throttled: adaptive cap of %r not told (%s)", key, error)
        _failing = True
    else:
        _failing = False
