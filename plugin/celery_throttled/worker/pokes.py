"""Wake-ups: run a key's grant again when its first waiter is blocked only by time.

A waiter blocked by a rate's next token has nobody to release a slot for it: no event will
come. The lease script that found it so says when the token is due (``Outcome.wake_at``, in
Redis time); this worker then schedules one *poke* of that key on its consumer's timer, a
:class:`~..transport.leases.Renew` of the key, which runs the key's grant at that moment. No
loop polls Redis meanwhile, no pool process is taken, the message stays unacknowledged.

One poke per key at a time (the earliest asked for wins); a poke is idempotent, so one that
comes too early only learns the due time again. Among the workers that learn of the same due
time, the script tells only the first (``flow_claim`` in ``lua/admission.lua``), so a backlog
costs one poke per token, not one per worker. Should that worker die before its poke, the next
renewal of any worker holding a waiter of the key (every ``throttle_lease_ttl / 3``) runs the
grant instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["Pokes"]


class Pokes:
    """The pending wake-ups of one worker, one per key; used on the consumer's loop thread."""

    def __init__(
        self, call_later: Callable[[float, Callable[[], None]], Any], poke: Callable[[str], None]
    ) -> None:
        self._call_later = call_later
        self._poke = poke
        self._due: dict[str, tuple[float, Any]] = {}

    def wake(self, key: str, at_ms: int, now_ms: int) -> None:
        """Poke ``key`` at ``at_ms`` (Redis time, which said ``now_ms`` when it replied)."""
        delay = max(0.0, (at_ms - now_ms) / 1000.0)
        due = time.monotonic() + delay
        scheduled = self._due.get(key)
        if scheduled is not None:
            if scheduled[0] <= due + 0.0005:
                return
            scheduled[1].cancel()
        self._due[key] = (due, self._call_later(delay, lambda: self._fire(key, due)))

    def _fire(self, key: str, due: float) -> None:
        scheduled = self._due.get(key)
        if scheduled is None or scheduled[0] != due:
            return  # replaced by an earlier one
        del self._due[key]
        self._poke(key)

    def cancel_all(self) -> None:
        for _, entry in self._due.values():
            entry.cancel()
        self._due.clear()

    def __len__(self) -> int:
        return len(self._due)
