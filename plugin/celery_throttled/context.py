"""``current_context()``: the running task's deadline and cancellation, like a Go context.

Inside a running throttled task it describes that run; anywhere else it is the *background*
context: no deadline, never cancelled (so library code can call it unconditionally).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import Cancelled, DeadlineExceeded

__all__ = ["TaskContext", "current_context"]


@dataclass
class TaskContext:
    """What a running task may ask about its own run.

    ``deadline`` is an epoch timestamp (seconds) or ``None``.
    """

    task_id: str | None = None
    deadline: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel_probe: Callable[[], bool] | None = field(default=None, repr=False)

    @property
    def cancelled(self) -> bool:
        """True once cancellation of this run was requested."""
        if self._cancel.is_set():
            return True
        if self._cancel_probe is not None and self._cancel_probe():
            self._cancel.set()
            return True
        return False

    def cancel(self) -> None:
        self._cancel.set()

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or ``None`` without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.time())

    def expired(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def check(self) -> None:
        """Raise :class:`Cancelled` or :class:`DeadlineExceeded` if the run should stop."""
        if self.cancelled:
            raise Cancelled(f"task {self.task_id} was cancelled")
        if self.expired():
            raise DeadlineExceeded(f"task {self.task_id} passed its deadline")


BACKGROUND = TaskContext()
_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar(
    "celery_throttled_context", default=BACKGROUND
)


def current_context() -> TaskContext:
    """The running task's context, or the background context outside a task."""
    return _current.get()


def enter(ctx: TaskContext) -> contextvars.Token[TaskContext]:
    return _current.set(ctx)


def leave(token: contextvars.Token[TaskContext]) -> None:
    _current.reset(token)
