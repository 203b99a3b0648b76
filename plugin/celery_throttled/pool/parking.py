"""A waiter parked in an idle pool process: its body starts the moment its grant is made.

A hand-off through the worker's main process costs a dispatch: the grant reaches the main
process, which writes the job to a pool process, which wakes up and starts the tracer. A
*parked* waiter has been written to an idle pool process already (:mod:`..worker.parking`
decides when), where :func:`run_parked` blocks on the holder's park list; the script that grants
the slot pushes ``go`` onto that list (``lua/admission.lua``, ``flow_hand``), so the body starts
as the slot is freed, anywhere in the cluster::

    main process: waiting, a pool process idle -> the job written to the process
    pool process: the holder is marked parked already (its acquire marked it, the first time
                  it is parked), or it marks it (park.lua: HSET parked; ZSCORE holders: granted?)
                  BLPOP <park list>  ...  "go"  -> the tracer, the body (task_prerun fires here)
                                      or "off" -> returns UNPARKED: the body never ran

Each park has a list of its own (a nonce in its name, the holder's value in the parked hash),
so nothing pushed for an earlier park of the same holder (a retry reuses its task id) is read
by a later one. Every second without a word, the process looks at the holders and the waiters:
a grant whose "go" was lost (the parked hash lost with a Redis restart, the holders restored by
renewals) still starts the body, and a holder that is not even waiting any more (its worker
released it but could not unpark it) leaves.

Until ``go`` nothing of the task has run: no signal fired, no result stored, its message not
acknowledged; the main process treats an ``UNPARKED`` reply as "back in line". This process
also gives up (returns ``UNPARKED``) when Redis cannot be reached or its worker is gone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import current_app

from .. import request as protocol
from ..settings import process_client
from ..transport.scripts import read_script

__all__ = ["UNPARKED", "is_unparked", "run_parked"]

logger = logging.getLogger(__name__)

#: what a parked job returns when it leaves without running (the reply's ``retval``)
UNPARKED = "celery-throttled:unparked"

_PARK = read_script("park.lua")

#: the parked hash expires this long after the key's last park (a dead worker's entries go)
PARKED_TTL_MS = 86_400_000

#: seconds of each BLPOP; between two, the process checks that its worker is still there
POLL = 1.0


def run_parked(trace: Callable[..., Any], park: dict[str, Any], *args: Any) -> Any:
    """The pool's job for a parked request: wait for ``go`` on ``park["list"]``, then run
    ``trace(*args)`` (Celery's tracer, as the worker would have called it)."""
    client, _ = process_client(current_app._get_current_object())
    parent = os.getppid()
    try:
        word = None if park.get("marked") else _park(client, park)
        while word is None:
            got = client.blpop([park["list"]], timeout=POLL)
            if got is not None:
                word = _word(got[1])
            elif os.getppid() != parent:
                return (0, UNPARKED, 0.0)
            else:
                word = _look(client, park)
    except redis.RedisError as exc:
        logger.warning("celery-throttled: a parked task left its pool process (%s)", exc)
        return (0, UNPARKED, 0.0)
    if word != b"go":
        return (0, UNPARKED, 0.0)
    message = args[2]  # the request's dict: its ``throttle`` header says how long it waited
    info = message.get(protocol.INFO.name) if isinstance(message, dict) else None
    if isinstance(info, dict):
        info["admitted_at"] = now = time.time()
        info["waited"] = max(0.0, now - float(park["since"]))
    return trace(*args)


def _park(client: redis.Redis, park: dict[str, Any]) -> bytes | None:
    """Mark the holder parked (``lua/park.lua``; a park its acquire marked needs none): ``go``
    when it was granted already, ``off`` when it was unparked already, else None (it waits)."""
    keys = [park["holders"], park["parked"], park["list"]]
    args = [park["holder"], park["nonce"], PARKED_TTL_MS]
    return _word(_PARK.run(client, keys, args))


def _look(client: redis.Redis, park: dict[str, Any]) -> bytes | None:
    """A second without a word: ``go`` when the holder holds its slot (granted, its "go" lost
    with its mark, in a Redis restart), ``off`` when it is not even waiting any more (its worker
    let it go, and could not say so), else None."""
    pipe = client.pipeline(transaction=False)
    pipe.zscore(park["holders"], park["holder"])
    pipe.zscore(park["waiters"], park["holder"])
    pipe.lpop(park["list"])  # a word pushed since the BLPOP gave up
    holds, waits, word = pipe.execute()
    if word is not None:
        return _word(word)
    if holds is not None:
        logger.warning("celery-throttled: a parked task's go was lost; it starts now")
        return b"go"
    return b"off" if waits is None else None


def _word(reply: Any) -> bytes | None:
    """A word read from Redis ("go", "off") as bytes, whether the client decodes or not."""
    if isinstance(reply, str):
        return reply.encode()
    return reply if isinstance(reply, bytes) else None


def is_unparked(reply: Any) -> bool:
    """Whether a job's reply is a parked job's that left without running."""
    return isinstance(reply, tuple) and len(reply) == 3 and reply[1] == UNPARKED
