"""Soft and hard timeouts for the pools Celery leaves without them (threads, solo).

Prefork enforces ``soft_time_limit`` / ``time_limit`` itself (a signal in the child; the child
killed and replaced at the hard limit), and celery-throttled relies on that. On the threads and
solo pools Celery ignores both silently; here one watchdog thread per worker process does this:

* at the soft timeout it raises ``SoftTimeLimitExceeded`` inside the task: in the main thread
  (solo) through ``SIGALRM``, which also interrupts a blocking call such as ``time.sleep``; in a
  pool thread through ``PyThreadState_SetAsyncExc``, which takes effect at the task's next
  Python instruction, so a task blocked in a C call (a socket read, ``time.sleep``) sees it
  when that call returns;
* at the hard timeout it reports a ``hard_timeout`` envelope to the caller at once. Threads
  cannot be killed: the code keeps running, its late outcome is discarded, its slot stays taken
  until it really returns (so the cap is never exceeded), and a warning says so.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

__all__ = ["Watchdog", "watchdog"]

logger = logging.getLogger(__name__)


class Timer:
    """One armed run: cancel it when the task returns."""

    __slots__ = ("cancelled", "done", "hard_fired", "soft_fired", "thread_id")

    def __init__(self, thread_id: int) -> None:
        self.thread_id = thread_id
        self.cancelled = False
        self.done = threading.Lock()
        self.soft_fired = False
        self.hard_fired = False

    def cancel(self) -> None:
        """Disarm; called by the task's own thread when the task returns."""
        with self.done:
            self.cancelled = True
            if self.soft_fired and threading.main_thread().ident != self.thread_id:
                # a SoftTimeLimitExceeded not yet delivered must not land outside the task
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), None)
        if threading.main_thread().ident == self.thread_id:
            signal.setitimer(signal.ITIMER_REAL, 0)


class Watchdog:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer, str, Callable[[], Any] | None]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._main_timer: Timer | None = None

    def arm(
        self, soft: float | None, hard: float | None, on_hard: Callable[[], Any] | None
    ) -> Timer:
        timer = Timer(threading.get_ident())
        now = time.monotonic()
        in_main = threading.current_thread() is threading.main_thread()
        if soft is not None and in_main:
            self._main_timer = timer
            signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, max(soft, 0.001))
        with self._cond:
            if soft is not None and not in_main:
                heapq.heappush(self._heap, (now + soft, next(self._seq), timer, "soft", None))
            if hard is not None:
                heapq.heappush(self._heap, (now + hard, next(self._seq), timer, "hard", on_hard))
            self._cond.notify()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="throttle-timeouts", daemon=True
                )
                self._thread.start()
        return timer

    def _alarm(self, signum: int, frame: Any) -> None:
        timer = self._main_timer
        if timer is None or timer.cancelled:
            return
        timer.soft_fired = True
        raise SoftTimeLimitExceeded()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    if self._heap:
                        self._cond.wait(self._heap[0][0] - time.monotonic())
                    else:
                        self._cond.wait()
                _, _, timer, what, on_hard = heapq.heappop(self._heap)
            with timer.done:
                if timer.cancelled:
                    continue
                if what == "soft":
                    timer.soft_fired = True
                    _raise_in(timer.thread_id, SoftTimeLimitExceeded)
                    continue
                timer.hard_fired = True
            if on_hard is not None:
                try:
                    on_hard()
                except Exception:
                    logger.exception("celery-throttled: reporting a hard timeout failed")


def _raise_in(thread_id: int, exc_type: type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type)
    )


watchdog = Watchdog()
