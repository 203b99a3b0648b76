"""Waiters parked in a prefork worker's idle pool processes, so that a hand-off skips dispatch.

A slot handed to a waiter through the worker's main process goes: the grant reaches the main
process, which writes the request to a pool process, which wakes up and starts the tracer.
While a pool process would sit idle anyway, the oldest waiters are written to them ahead of
their grant, *parked*: the process blocks on the holder's park list (:mod:`..pool.parking`),
and the script that grants the slot pushes ``go`` there, so the body starts as it is freed::

    the acquire that puts it in line marks it parked, with a nonce of its own (grants to the
        holder now also push "go" onto that park list; the holder's entry goes as it leaves
        the line, granted or not)
    waiting, an idle pool process, nothing else queued for one -> written to the process,
        which waits on that list (parked again later, its process marks a fresh one: park.lua)
    the grant (anywhere in the cluster)  -> "go": the body runs; the grant still reaches this
        process, which counts the request as running (and Celery hears it started)
    the process wanted for other work, a policy of the sweep, a revocation, the worker stopping
        -> unpark.lua: "off" on its list -> the job comes back unrun, back in line

Which waiters: on a prefork worker whose tasks are not all under Celery time limits; among the
:data:`LOOK` oldest, the oldest first, at most the key's cap of them; none with Celery time
limits (a parked job goes to the pool without them), an errgroup's limit, or a caller's deadline
(checked where the gate admits), nor of an adaptive key (a wave of grants that all start at once
sharpens slow start). A parked request's message stays unacknowledged and Celery does not
count it active until its body starts (:mod:`.parkjob`). Unrelated work is never held back:
whenever a request queues for a pool process (every process busy), one parked waiter leaves its
process. A waiter the sweep's policies apply to, or that was revoked, is called back and judged
as it comes back; one whose job left by itself (Redis unreachable) is not parked again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery.worker import state as worker_state
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import request as protocol
from ..keys import Family
from ..transport.scripts import read_script
from . import parkjob
from .lines import Held

__all__ = ["Parking", "Spot"]

logger = logging.getLogger(__name__)

_UNPARK = read_script("unpark.lua")

PARKED, RETURNING = "parked", "returning"

#: seconds without parking (and without calls to unpark) after Redis failed
PAUSE = 5.0
#: the oldest waiters each fill looks at: the next grants go to the head of the line
LOOK = 64
#: seconds an unpark may hold the worker's event loop: its call is synchronous, so an outage
#: costs the loop at most this, once per PAUSE (a parked job leaves by itself meanwhile)
UNPARK_TIMEOUT = 0.25


@dataclass
class Spot:
    """Where a parked request waits: its park list, and how far its way back has gone."""

    #: "parked" (its job waits in a pool process), "returning" (told "off", not back yet)
    state: str
    #: the park list its pool process blocks on (a fresh one each time it is parked)
    list: str
    #: its grant came while it was parked: its body runs in its pool process
    started: bool = False
    #: its grant came while it was returning: it is admitted once its job is back
    granted_back: bool = False
    #: the pool process that took the job before the grant (Celery hears of it at the grant)
    accepted: int | None = None


class Parking:
    """The waiters one prefork worker has parked in its idle pool processes."""

    def __init__(
        self,
        gate: Any,
        admit: Callable[[Held], None],
        started: Callable[[Held], None],
        ended: Callable[[Held, str, bool], None],
        judge: Callable[[Held], None],
    ) -> None:
        self.gate = gate
        self._admit, self._started, self.ended, self._judge = admit, started, ended, judge
        semaphore: Any = getattr(getattr(gate.consumer, "controller", None), "semaphore", None)
        self.semaphore: Any = semaphore
        self.enabled = bool(
            gate.settings.park
            and gate.pool_kind == "prefork"
            and hasattr(semaphore, "value")
            and hasattr(semaphore, "_waiting")
        )
        conf, settings = gate.consumer.app.conf, gate.settings
        if self.enabled and (conf.task_time_limit or conf.task_soft_time_limit):
            self.enabled = False  # no request could be parked: no line walked for nothing
            logger.warning(
                "celery-throttled: throttle_park is on, but Celery time limits are set for "
                "every task (a parked job would run without them): nothing is parked here"
            )
        self.prefix = settings.key_prefix
        self.ttl_ms = int(settings.lease_ttl * 1000)
        #: parked (or returning) requests, oldest first
        self.parked: dict[tuple[str, str], Held] = {}
        self._paused_until = 0.0
        self.client: Any = None
        if self.enabled:
            #: unpark is a call on the event loop: short timeouts, no retries (UNPARK_TIMEOUT)
            self.client = settings.client(
                socket_timeout=UNPARK_TIMEOUT,
                socket_connect_timeout=UNPARK_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
            )
            parkjob.hook_revoke()

    # -- when --------------------------------------------------------------------------------
    def fill(self) -> None:
        """Park the oldest waiters while pool processes are idle and nothing else wants one."""
        semaphore = self.semaphore
        paused = time.monotonic() < self._paused_until
        if not self.enabled or paused or semaphore.value <= 0 or semaphore._waiting:
            return
        per_key = Counter(held.key for held in self.parked.values())
        for held in self.gate.lines.oldest(LOOK):
            if semaphore.value <= 0 or semaphore._waiting:
                return
            if per_key[held.key] < held.cap and self._may_park(held):
                self.park(held)
                per_key[held.key] += 1

    def make_room(self) -> None:
        """A request queues for a pool process: parked waiters leave as many processes."""
        if not self.parked:
            return
        returning = sum(1 for h in self.parked.values() if h.park and h.park.state == RETURNING)
        wanted = len(self.semaphore._waiting) - returning
        for held in reversed(list(self.parked.values())):
            if wanted <= 0:
                return
            spot = held.park
            if spot is not None and spot.state == PARKED and not spot.started:
                self.unpark(held)
                wanted -= 1

    def nonce(self, held: Held) -> str:
        """The park nonce ``held``'s acquire marks it with if it waits (``""``: it could never
        be parked): its first park then costs its pool process no ``park.lua``."""
        held.park_nonce = _nonce() if self.enabled and self._parkable(held) else ""
        return held.park_nonce

    def _may_park(self, held: Held) -> bool:
        fresh = held.queued and held.park is None and not held.stay and not held.released
        return fresh and self._parkable(held) and held.req.id not in worker_state.revoked

    def _parkable(self, held: Held) -> bool:
        """What never changes while ``held`` waits: whether a request like it is ever parked."""
        req = held.req
        return bool(
            held.outer is None
            and held.next_cap is None
            and req.task.time_limit is None
            and req.task.soft_time_limit is None
            and not any(req.time_limits or ())
            and protocol.deadline(req) is None
            and protocol.group(req) is None
            and (held.admission is None or held.admission.adaptive is None)
        )

    def revoked(self, task_ids: set[str]) -> None:
        """Revoked (Celery's ``revoke``): a parked one leaves its process before its grant can
        start it there, and is discarded as it comes back."""
        for held in list(self.parked.values()):
            if held.req.id in task_ids:
                self.recall(held)

    # -- park, unpark ------------------------------------------------------------------------
    def park(self, held: Held) -> None:
        """Write ``held`` to an idle pool process, to wait there for its grant."""
        family = Family.of(self.prefix, held.key)
        marked = bool(held.park_nonce)  # by its acquire; parked again, its process marks it
        nonce, held.park_nonce = held.park_nonce or _nonce(), ""
        spot = held.park = Spot(PARKED, family.park_list(held.holder, nonce))
        self.parked[(held.key, held.holder)] = held
        protocol.info(held.req).update(leases=held.leases())
        park = {
            "holder": held.holder,
            "nonce": nonce,
            "holders": family.holders,
            "waiters": family.waiters,
            "parked": family.parked,
            "list": spot.list,
            "since": time.time() - (time.monotonic() - held.since),
            "marked": marked,
        }
        parkjob.send(self, held, park)

    def recall(self, held: Held) -> None:
        """``held`` leaves its pool process for good (never parked again): it is judged, or
        discarded, as it comes back."""
        held.stay = True
        self.unpark(held)

    def unpark(self, held: Held) -> bool:
        """``held`` leaves its pool process unrun ("off"), or runs there: True when it holds
        its slot already (its body runs)."""
        spot = held.park
        if spot is None or spot.state != PARKED or spot.started:
            return spot is not None and spot.started
        holds = 0
        if time.monotonic() >= self._paused_until:  # else its process leaves by itself
            family = Family.of(self.prefix, held.key)
            keys, args = [family.holders, family.parked, spot.list], [held.holder, self.ttl_ms]
            try:
                holds = int(_UNPARK.run(self.client, keys, args))
            except redis.RedisError as exc:
                logger.warning("celery-throttled: could not unpark %s (%s)", held.req.id, exc)
                self._paused_until = time.monotonic() + PAUSE
        if holds:
            self.started(held)
            return True
        spot.state = RETURNING
        return False

    def started(self, held: Held) -> None:
        """``held``'s grant was made while parked: its body runs in its pool process."""
        spot = held.park
        if spot is None or spot.started:
            return
        spot.started = True
        self._started(held)
        parkjob.accepted(held)

    def granted(self, held: Held) -> bool:
        """A grant reached this process for ``held``: True when parking owns what follows."""
        spot = held.park
        if spot is None:
            return False
        if spot.state == PARKED:
            self.started(held)
        else:
            spot.granted_back = True
        return True

    # -- the job's way back ------------------------------------------------------------------
    def came_back(self, held: Held) -> None:
        """The job came back without running the body."""
        spot = held.park
        if spot is None:
            return
        if spot.state == PARKED and not spot.started:  # it left by itself: Redis unreachable
            self._paused_until = time.monotonic() + PAUSE
            self.recall(held)
        self._forget(held)
        parkjob.unhook(held)
        if held.released:
            return
        if spot.started or spot.granted_back:
            self._admit(held)  # it holds its slot: dispatched as any admitted request
        elif held.stay:
            self._judge(held)  # called back by a policy, or revoked
        else:
            self.fill()

    def ran(self, held: Held) -> None:
        """The parked job ran its body: an ordinary running request from here."""
        spot = held.park
        if spot is not None:
            self.started(held)
            self._forget(held)

    def ran_before_loss(self, held: Held) -> bool:
        """The process of a parked job died: whether its body may have run (it took its
        "go"). A "go" still on its list is taken back: the slot stays with the request."""
        if not self.unpark(held):
            return False
        spot = held.park
        try:
            return spot is None or self.client.lpop(spot.list) != b"go"
        except redis.RedisError:
            self._paused_until = time.monotonic() + PAUSE
            return True

    def _forget(self, held: Held) -> None:
        self.parked.pop((held.key, held.holder), None)
        held.park = None


def _nonce() -> str:  # the end of a park list's name, unique to one park
    return uuid.uuid4().hex[:12]
