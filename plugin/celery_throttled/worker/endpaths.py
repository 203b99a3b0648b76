"""Release the slot on every way a running request can end.

Celery's revoke path calls neither ``on_success`` nor ``on_failure``; a hard time limit is
reported twice (``on_timeout``, then a lost worker); a failed run reaches ``on_failure`` from
inside ``on_success``. Every one of those paths is hooked, and the release they call is
idempotent, so the slot goes back exactly once, with the outcome of the first path that ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery.exceptions import Retry

__all__ = ["hook_end_paths"]


def hook_end_paths(req: Any, release: Callable[[str, bool], None]) -> None:
    """Release the slot on every way a running request can end.

    Celery builds a request class per task whose ``on_success`` does not call ``super()``, so
    the hooks are set on the instance, where ``execute_using_pool`` looks them up. A failed run
    reaches ``on_failure`` from inside ``on_success``: the inner hook releases first, as failed.

    ``release(outcome, later)``: ``later`` is true inside ``on_success``, Celery's report of a
    run that came back from the pool, whose process freed the slot as the body ended
    (:mod:`..pool.release`); the worker's own release is then only a safety net.
    """
    on_success, on_failure, on_timeout = req.on_success, req.on_failure, req.on_timeout
    came_back = False

    def on_success_hooked(*args: Any, **kwargs: Any) -> Any:
        nonlocal came_back
        came_back = True
        try:
            return on_success(*args, **kwargs)
        finally:
            release("done", True)

    def on_failure_hooked(exc_info: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return on_failure(exc_info, *args, **kwargs)
        finally:
            exc = getattr(exc_info, "exception", None)
            if isinstance(exc, ExceptionWithTraceback):  # how the threads and solo pools pass it
                exc = exc.exc
            release("retried" if isinstance(exc, Retry) else "failed", came_back)

    def on_timeout_hooked(soft: bool, timeout: float) -> Any:
        try:
            return on_timeout(soft, timeout)
        finally:
            if not soft:
                release("failed", False)

    req.on_success = on_success_hooked
    req.on_failure = on_failure_hooked
    req.on_timeout = on_timeout_hooked
    for name in ("_announce_revoked", "_announce_cancelled"):
        original = getattr(req, name)

        def hooked(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            try:
                return _original(*args, **kwargs)
            finally:
                release("failed", False)

        setattr(req, name, hooked)
