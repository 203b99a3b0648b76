"""The prefetch window: widened by one for each request that really waits for a slot.

A held request's message stays unacknowledged, so it counts against the consumer's prefetch
window; each one that waits widens the window by one (up to ``throttle_max_held``) so that
unrelated tasks on the same queue keep flowing, and narrows it again when it leaves the line.
An uncontended acquire costs no QoS change.
"""

from __future__ import annotations

from typing import Any

from .lines import Held

__all__ = ["Window"]


class Window:
    """The QoS of one consumer, as far as held requests widen it. Loop thread only."""

    def __init__(self, consumer: Any, limit: int) -> None:
        self.consumer = consumer
        self.limit = limit
        self.widened = 0

    def widen(self, held: Held) -> None:
        if not held.widened and self.widened < self.limit:
            self.consumer.qos.increment_eventually()
            self.widened += 1
            held.widened = True

    def narrow(self, held: Held) -> None:
        if held.widened:
            held.widened = False
            self.widened -= 1
            self.consumer.qos.decrement_eventually()

    def forget(self, held: list[Held]) -> None:
        """The consumer stopped: its QoS starts afresh, nothing to narrow."""
        for one in held:
            one.widened = False
        self.widened = 0
