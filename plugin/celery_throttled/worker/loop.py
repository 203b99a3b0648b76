"""The consumer's loop thread: the gate acts there only; calls from other threads hop onto it.

The threaded transport reports from its own threads; the event-loop transport from the loop
itself, where a grant is admitted at once, without a hop.

On kombu's event loop (the hub) the gate's timers (a rate's token wake-ups, :mod:`.pokes`) are
hub timer entries, and :func:`poll_until_the_next_timer` keeps them on time. kombu's
``Hub.fire_timers`` fires at most 10 due entries a turn, and when the 10th fired it has no
delay to the next entry and returns its ``min_delay``, 1 s, as the poll timeout, however many
entries are due. Celery's own ``rate_limit`` makes that happen: a rate-limited request that
finds its bucket empty schedules an entry to try again, every message arriving meanwhile adds
one, and every entry that fires without a token adds another, so tens pile up under a backlog.
The loop then turns about once a second: Celery's rate-limited tasks start at about one a
second per worker, and the gate's wake-ups wait as long.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Loop", "poll_until_the_next_timer"]


def poll_until_the_next_timer(hub: Any) -> None:
    """Make ``hub`` poll no longer than until its next timer entry is due (0 while one is due),
    keeping kombu's at most 10 entries fired a turn. Idempotent; before the hub's loop starts,
    which reads ``fire_timers`` once."""
    if getattr(hub, "_throttle_polls_until_next_timer", False):
        return
    fire = getattr(hub, "fire_timers", None)
    # kombu's heap of (eta on the monotonic clock, priority, entry); private, so a kombu
    # without it keeps its own polling
    queue = getattr(getattr(hub, "timer", None), "_queue", None)
    if fire is None or not isinstance(queue, list):
        return

    def fire_timers(*args: Any, **kwargs: Any) -> Any:
        delay = fire(*args, **kwargs)
        if queue:
            return min(delay, max(0.0, queue[0][0] - time.monotonic()))
        return delay

    hub.fire_timers = fire_timers
    hub._throttle_polls_until_next_timer = True


class Loop:
    """The thread that runs ``consumer``'s event loop (or its timer, without a hub)."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.thread = threading.get_ident()
        if getattr(consumer, "hub", None) is not None:
            poll_until_the_next_timer(consumer.hub)

    def enter(self) -> None:
        """The consumer starts on this thread."""
        self.thread = threading.get_ident()

    def call_soon(self, fun: Callable[..., Any], *args: Any) -> None:
        """Run ``fun`` on the loop thread soon (from any thread)."""
        hub = self.consumer.hub
        if hub is not None:
            hub.call_soon(fun, *args)
        else:
            self.consumer.timer.call_after(0, fun, args)

    def call_later(self, delay: float, fun: Callable[[], None]) -> Any:
        """Run ``fun`` on the loop thread after ``delay`` seconds; the entry has ``cancel()``."""
        hub = self.consumer.hub
        if hub is not None:
            return hub.call_later(delay, fun)
        return self.consumer.timer.call_after(delay, fun)

    def on_loop(self, fun: Callable[..., None]) -> Callable[..., None]:
        """``fun`` called inline on the loop thread, and from any other thread by a hop."""

        def call(*args: Any) -> None:
            if threading.get_ident() == self.thread:
                fun(*args)
            else:
                self.call_soon(fun, *args)

        return call

    def batched(self, fun: Callable[..., None]) -> Callable[..., None]:
        """As :meth:`on_loop`, but calls from other threads queue up and run in one hop."""
        queued: deque[tuple[Any, ...]] = deque()
        lock = threading.Lock()
        scheduled = False

        def drain() -> None:
            nonlocal scheduled
            with lock:
                scheduled = False
                calls = list(queued)
                queued.clear()
            for args in calls:
                fun(*args)

        def call(*args: Any) -> None:
            nonlocal scheduled
            if threading.get_ident() == self.thread:
                fun(*args)
                return
            with lock:
                queued.append(args)
                if scheduled:
                    return
                scheduled = True
            self.call_soon(drain)

        return call
