"""``ThrottledTask`` and ``@throttled_task``: a Celery task with a cluster-wide concurrency cap."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar, overload

from celery import Task, shared_task

from .errors import ConfigurationError, KeyFunctionError

__all__ = ["ThrottledTask", "throttled_task"]

F = TypeVar("F", bound=Callable[..., Any])
KeySpec = str | Callable[..., str] | None

_MAX_KEY_LENGTH = 1024
_static_keys: dict[str, tuple[int, str]] = {}
_static_keys_lock = threading.Lock()


class ThrottledTask(Task):  # type: ignore[misc]
    """A task whose runs are capped cluster-wide at ``throttle_limit`` per key.

    ``throttle_key`` is a string (every run shares it), a callable that receives the task's
    arguments and returns the key (one cap per value), or ``None`` (the task's name).
    """

    Strategy = "celery_throttled.strategy:throttled"
    throttle_limit: int | None = None
    throttle_key: KeySpec = None

    @classmethod
    def on_bound(cls, app: Any) -> None:
        from .strategy import ThrottleConsumerStep

        app.steps["consumer"].add(ThrottleConsumerStep)

    def throttle_key_for(self, args: Any, kwargs: Any) -> str:
        """The key a run with these arguments counts against."""
        spec = self.throttle_key
        if spec is None:
            return str(self.name)
        if isinstance(spec, str):
            return spec
        try:
            key = spec(*(args or ()), **(kwargs or {}))
        except Exception as exc:
            raise KeyFunctionError(
                f"task {self.name!r}: its key function {_describe(spec)} raised "
                f"{type(exc).__name__}: {exc}; the task did not run"
            ) from exc
        if not isinstance(key, str) or not key or len(key) > _MAX_KEY_LENGTH:
            raise KeyFunctionError(
                f"task {self.name!r}: its key function {_describe(spec)} returned {key!r}; "
                f"a key must be a non-empty str of at most {_MAX_KEY_LENGTH} characters; "
                "the task did not run"
            )
        return key


@overload
def throttled_task(fun: F, /) -> Any: ...


@overload
def throttled_task(
    *, limit: int | None = ..., key: KeySpec = ..., **options: Any
) -> Callable[[F], Any]: ...


def throttled_task(
    fun: Callable[..., Any] | None = None,
    /,
    *,
    limit: int | None = None,
    key: KeySpec = None,
    **options: Any,
) -> Any:
    """Like ``@shared_task``, with a cluster-wide cap on concurrent runs.

    ``limit``: at most this many runs per key at once across every worker (``None``: no cap).
    ``key``: a string shared by every task type that should share the cap, or a callable
    ``key(*args, **kwargs) -> str`` for one cap per value; default: the task's name.
    Every other option goes to ``shared_task`` (``name``, ``bind``, ``queue``, ``acks_late``…).
    """

    def create(f: Callable[..., Any]) -> Any:
        name = options.get("name") or f"{f.__module__}.{f.__qualname__}"
        _validate(name, limit, key)
        base = options.pop("base", ThrottledTask)
        if not (isinstance(base, type) and issubclass(base, ThrottledTask)):
            raise ConfigurationError(
                f"task {name!r}: base must be a subclass of ThrottledTask, got {base!r}"
            )
        return shared_task(base=base, throttle_limit=limit, throttle_key=key, **options)(f)

    if fun is not None:
        if not callable(fun):
            raise ConfigurationError(
                f"throttled_task takes its options as keywords, e.g. @throttled_task(limit=5); "
                f"got the positional argument {fun!r}"
            )
        return create(fun)
    return create


def _validate(name: str, limit: Any, key: Any) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigurationError(
            f"task {name!r}: limit must be a positive int or None, got {limit!r}"
        )
    if key is None or callable(key):
        return
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY_LENGTH:
        raise ConfigurationError(
            f"task {name!r}: key must be a non-empty str (at most {_MAX_KEY_LENGTH} "
            f"characters), a callable or None, got {key!r}"
        )
    if limit is None:
        return
    with _static_keys_lock:
        known = _static_keys.setdefault(key, (limit, name))
    if known[0] != limit and known[1] != name:
        raise ConfigurationError(
            f"task {name!r}: key {key!r} is already capped at {known[0]} by task "
            f"{known[1]!r}; tasks sharing a key must declare the same limit, got {limit!r}"
        )


def _describe(fun: Any) -> str:
    return getattr(fun, "__qualname__", None) or repr(fun)
