"""The worker's waiting lines: every request it holds for a slot or runs under a lease.

A request is *held* from its acquire until its release; in between it is *waiting* (in line for
a slot, its message unacknowledged) and then *running* (admitted to the pool, its lease renewed).
Each is filed under ``(key, holder)``; an errgroup member is filed twice in a row, under its
group's own limit and then under its task's cap. Thread-safe: the transport's threads read the
lines to renew the leases.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from itertools import islice
from typing import Any

from .. import request as protocol
from ..admission import Admission, rank
from ..keys import ERRGROUP_KEY_PREFIX, family_key, holder_id
from ..tracing import Wait, wait_ended
from ..transport.leases import Renew, lease_spec

__all__ = ["FAR", "LINGER", "Held", "Lines", "highest_first"]

#: a slot granted with this many others still free, and half its cap, was far from binding
FAR = 32
#: seconds the worker may keep the release of such a slot, waiting for an acquire to carry it
LINGER = 0.05


def highest_first(consumer: Any) -> bool:
    """How the consumer's broker reads a message's priority: True when it serves the highest
    first (RabbitMQ)."""
    connection = getattr(consumer, "connection", None) or consumer.app.connection_for_read()
    return bool(connection.transport.driver_type == "amqp")


class Held:
    """One request this worker holds or runs under a lease."""

    __slots__ = (
        "admission",
        "admitted_at",
        "cap",
        "deferred",
        "holder",
        "key",
        "next_cap",
        "outer",
        "park",
        "park_nonce",
        "queued",
        "rank",
        "released",
        "req",
        "since",
        "stay",
        "wait",
        "waited",
        "widened",
    )

    def __init__(
        self,
        req: Any,
        key: str,
        cap: int,
        holder: str,
        admission: Admission | None = None,
        rank: int = 0,
    ) -> None:
        self.req = req
        self.key = key
        self.cap = cap
        self.holder = holder
        #: the key's rate, family and pending rules; its place among priorities
        self.admission = admission
        self.rank = rank
        self.since = time.monotonic()
        self.widened = False
        #: it was told to wait in line: its grant is a hand-off, written to the pool at once
        self.queued = False
        self.released = False
        self.waited: float | None = None
        self.admitted_at: float | None = None
        #: the slot held while this one is waited for (an errgroup's own limit)
        self.outer: Held | None = None
        #: once this slot is granted, the task's own cap to wait for next
        self.next_cap: int | None = None
        #: the wait's trace span (:mod:`celery_throttled.tracing`), None without OpenTelemetry
        self.wait: Wait | None = None
        #: where it is parked in a pool process (:class:`.parking.Spot`), or None
        self.park: Any = None
        #: the nonce its acquire marked it parked with, until a park uses it (or "")
        self.park_nonce = ""
        #: never parked again (a policy is about to judge it, or it was revoked)
        self.stay = False
        #: its cap was far from binding as it was granted (:meth:`far_from_binding`): the
        #: worker, not its pool process, frees its slot
        self.deferred = False

    @classmethod
    def of(
        cls, req: Any, cap: int, key: str | None, worker: str, pending_ttl: float, highest: bool
    ) -> Held:
        """``req`` held by ``worker`` for a slot of ``key``; by default its task's key, under its
        task's admission rules (raises :class:`~..errors.KeyFunctionError` when its key function
        fails). Its place among priorities is read off its message (``highest``: the broker
        serves the highest priority first)."""
        admission = None
        if key is None:
            key = req.task.throttle_key_for(req.args, req.kwargs)
            admission = req.task.throttle_admission_for(req.args, req.kwargs)
            protocol.info(req)["key"] = key
            if admission is not None:
                admission = admission.on_worker(pending_ttl)
                key = family_key(admission.family, key)
        place = rank((req.delivery_info or {}).get("priority"), highest)
        return cls(req, key, cap, holder_id(worker, req.id), admission, place)

    def far_from_binding(self, room: int | None) -> bool:
        """Whether its cap is far from binding, granted with ``room`` slots still free (None:
        the grant did not say): :data:`FAR` of them and half the cap. Its pool process then
        leaves the release to the worker, which sends it in its next acquire of the key, or
        after :data:`LINGER` at the latest: one script call per task rather than two, where no
        waiter gains by a slot freed sooner. Never for a slot held with an errgroup's; nor for
        a key in a family (the room is the key's own, the family's total may bind), with an
        adaptive cap (its holders are its evidence) or with ``max_pending`` (its pending count
        decides who is refused at submit, at once)."""
        if room is None or room < FAR or 2 * room < self.cap or self.outer is not None:
            return False
        rules = self.admission
        if rules is None:
            return True
        return rules.family is None and rules.adaptive is None and rules.max_pending is None

    def leases(self) -> list[list[str]]:
        """``[key, holder, spec]`` of this slot and of the slots held with it (an errgroup's):
        what the pool process releases as the body ends (:mod:`..pool.release`)."""
        held: Held | None = self
        out = []
        while held is not None:
            out.append([held.key, held.holder, lease_spec(held.key, held.cap, held.admission)])
            held = held.outer
        return out


class Lines:
    """The requests one worker holds, by ``(key, holder)``, and each key's declared cap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, str], Held] = {}
        self._running: dict[tuple[str, str], Held] = {}
        self._caps: dict[str, int] = {}
        self._admissions: dict[str, Admission | None] = {}
        #: requests holding or waiting for a slot of each key (held here, not yet released)
        self._uses: Counter[str] = Counter()

    def join(self, held: Held) -> bool:
        """``held`` waits in line (its holder made unique here); True for a key new here."""
        key, holder = held.key, held.holder
        with self._lock:
            n = 1
            while (key, held.holder) in self._waiting or (key, held.holder) in self._running:
                n += 1
                held.holder = f"{holder}#{n}"
            self._waiting[(key, held.holder)] = held
            new_key = key not in self._caps
            self._caps[key] = held.cap
            self._admissions[key] = held.admission
            self._uses[key] += 1
        return new_key

    def granted(self, key: str, holder: str) -> tuple[Held | None, bool, int]:
        """The waiting request granted this slot, leaving the line (None if there is none);
        whether the holder already runs here; the key's cap."""
        with self._lock:
            held = self._waiting.pop((key, holder), None)
            return held, (key, holder) in self._running, self._caps.get(key, 1)

    def waiter(self, key: str, holder: str) -> Held | None:
        with self._lock:
            return self._waiting.get((key, holder))

    def run(self, held: Held) -> None:
        """``held`` holds its slot now: its wait ended, admitted."""
        with self._lock:
            self._waiting.pop((held.key, held.holder), None)
            self._running[(held.key, held.holder)] = held
        wait_ended(held.wait, "admitted", held.waited)

    def leave(self, held: Held) -> bool:
        """``held`` gives its slot or its place back; False when it already did."""
        with self._lock:
            if held.released:
                return False
            held.released = True
            self._running.pop((held.key, held.holder), None)
            self._waiting.pop((held.key, held.holder), None)
            self._uses[held.key] -= 1
            if self._uses[held.key] <= 0:
                del self._uses[held.key]
                if held.key.startswith(ERRGROUP_KEY_PREFIX):
                    self._caps.pop(held.key, None)  # one-off keys must not pile up
                    self._admissions.pop(held.key, None)
        return True

    def waiting(self) -> list[Held]:
        with self._lock:
            return list(self._waiting.values())

    def oldest(self, n: int) -> list[Held]:
        """The ``n`` requests that have waited here longest, oldest first."""
        with self._lock:
            return list(islice(self._waiting.values(), n))

    def running_holders(self, key: str) -> set[str]:
        with self._lock:
            return {h for (k, h) in self._running if k == key}

    def renewals(self) -> list[Renew]:
        """One renewal per key: its running and waiting holders here."""
        by_key: dict[str, tuple[list[str], list[str]]] = {}
        with self._lock:
            for key, holder in self._running:
                by_key.setdefault(key, ([], []))[0].append(holder)
            for key, holder in self._waiting:
                by_key.setdefault(key, ([], []))[1].append(holder)
            caps = dict(self._caps)
            admissions = dict(self._admissions)
        return [
            Renew(key, caps.get(key, 1), run, wait, admissions.get(key))
            for key, (run, wait) in by_key.items()
        ]

    def rules(self, key: str) -> tuple[int, Admission | None]:
        """The cap and admission rules this worker last declared for ``key`` (0: unknown)."""
        with self._lock:
            return self._caps.get(key, 0), self._admissions.get(key)

    def rates(self) -> dict[str, float]:
        """Per key with a rate: starts per second (for the metrics gauge)."""
        with self._lock:
            return {
                key: admission.rate.per_second
                for key, admission in self._admissions.items()
                if admission is not None and admission.rate is not None
            }

    def counts(self) -> dict[str, tuple[int, int, int]]:
        """Per key: declared cap (``UNCAPPED``: none), running here, waiting here (for the
        metrics gauges)."""
        with self._lock:
            out = {key: [cap, 0, 0] for key, cap in self._caps.items()}
            for key, _ in self._running:
                out.setdefault(key, [0, 0, 0])[1] += 1
            for key, _ in self._waiting:
                out.setdefault(key, [0, 0, 0])[2] += 1
        # one series per errgroup would grow without bound: errgroups' own limits are left out
        return {
            key: (c, r, w)
            for key, (c, r, w) in out.items()
            if not key.startswith(ERRGROUP_KEY_PREFIX)
        }
