"""The consumer's loop thread: the gate acts there only; calls from other threads hop onto it.

The threaded transport reports from its own threads; the event-loop transport from the loop
itself, where a grant is admitted at once, without a hop.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Loop"]


class Loop:
    """The thread that runs ``consumer``'s event loop (or its timer, without a hub)."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.thread = threading.get_ident()

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
