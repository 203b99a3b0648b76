"""``ThrottledTask`` and ``@throttled_task``: a Celery task with a cluster-wide concurrency cap."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from celery import Task, shared_task
from celery.utils import uuid

from . import deadlines
from . import request as protocol
from .adaptive import Adaptive
from .admission import UNCAPPED, Admission, validate_priority
from .backpressure import admit
from .context import current_context
from .declarations import MAX_KEY_LENGTH, validate_limit, validate_shared, validate_timeout
from .errors import ConfigurationError, KeyFunctionError
from .policies import RetryPolicy, validate_wait
from .pool import execution
from .pool.backend import envelope_backend
from .results import EagerEnvelopeResult, EnvelopeResult

__all__ = ["ThrottledTask", "throttled_task"]

F = TypeVar("F", bound=Callable[..., Any])
KeySpec = str | Callable[..., str] | None


class ThrottledTask(Task):  # type: ignore[misc]
    """A task whose runs are capped cluster-wide at ``throttle_limit`` per key.

    ``throttle_key`` is a string (every run shares it), a callable that receives the task's
    arguments and returns the key (one cap per value), or ``None`` (the task's name).
    """

    Strategy = "celery_throttled.worker.strategy:throttled"
    throttle_limit: int | None = None
    throttle_key: KeySpec = None
    throttle_max_wait: float | None = None
    throttle_on_full: str = "wait"
    throttle_fallback: Callable[..., Any] | None = None
    #: rate, family and total, max_pending (:mod:`celery_throttled.admission`), or None
    throttle_admission: Admission | None = None
    #: the task's RetryPolicy, whose backoff sets each retry's countdown (see :meth:`retry`)
    throttle_retry: RetryPolicy | None = None

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Celery's ``retry``; without a countdown or an eta, a task with a RetryPolicy waits
        its policy's backoff (:meth:`~.policies.RetryPolicy.delay`, fractions of a second
        kept)."""
        policy = self.throttle_retry
        if policy is not None and countdown is None and eta is None:
            countdown = policy.delay(int(self.request.retries or 0))
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)

    @property
    def throttle_cap(self) -> int | None:
        """The cap its keys wait for: ``limit``; without one, a key that only has a rate or a
        family's total has no cap of its own (``UNCAPPED``); None: no lease at all."""
        if self.throttle_limit is not None:
            return int(self.throttle_limit)
        if self.throttle_admission is not None and self.throttle_admission.needs_lease:
            return UNCAPPED
        return None

    @classmethod
    def on_bound(cls, app: Any) -> None:
        # by name: Celery's blueprint loads it when the consumer starts, in the worker only
        app.steps["consumer"].add("celery_throttled.worker.strategy:ThrottleConsumerStep")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request_stack.top
        if request is None or request.called_directly:
            return super().__call__(*args, **kwargs)  # a plain function call
        return execution.run(self, self.run, args, kwargs)

    @property
    def backend(self) -> Any:
        """Writes go through the envelope backend; see :mod:`celery_throttled.pool.backend`."""
        if self._backend is not None:
            return self._backend
        return envelope_backend(self.app)

    @backend.setter
    def backend(self, value: Any) -> None:
        self._backend = value

    def AsyncResult(self, task_id: str, **kwargs: Any) -> EnvelopeResult:
        app = self._get_app()
        backend = kwargs.pop("backend", None) or self._backend or app.backend
        return EnvelopeResult(task_id, backend=backend, task_name=self.name, app=app, **kwargs)

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Celery's ``apply_async``, plus ``deadline=``: seconds from now or an aware datetime.

        Inside a running throttled task the caller's own deadline flows down: the child gets
        the earlier of the two. A ``priority`` outside Celery's range (0-9) raises
        ``ConfigurationError``; a key already at ``max_pending`` raises ``Backpressure``, and
        nothing is sent.
        """
        validate_priority(self.name, options.get("priority", self.priority))
        deadline = deadlines.absolute(self.name, options.pop("deadline", None))
        inherited = current_context().deadline
        if inherited is not None:
            deadline = inherited if deadline is None else min(deadline, inherited)
        if deadline is not None:
            options["headers"] = protocol.DEADLINE.into(options.pop("headers", None), deadline)
        admission = self.throttle_admission
        if admission is not None and admission.max_pending and not self._eager():
            task_id = task_id or uuid()
            admit(self, args, kwargs, task_id, options)
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow, **options
        )

    def _eager(self) -> bool:
        """Whether this call runs inline (``task_always_eager``), where nothing is pending."""
        return bool(self._get_app().conf.task_always_eager)

    def apply(self, args: Any = None, kwargs: Any = None, *a: Any, **options: Any) -> Any:
        """Eager execution: runs inline and returns an :class:`EagerEnvelopeResult`."""
        options.pop("deadline", None)
        result = super().apply(args, kwargs, *a, **options)
        if isinstance(result, EagerEnvelopeResult):
            return result
        eager = EagerEnvelopeResult(
            result.id, result._result, result._state, traceback=result.traceback, name=self.name
        )
        protocol.ENVELOPE.set(eager, execution.eager_details.pop(result.id, None))
        return eager

    def throttle_admission_for(self, args: Any, kwargs: Any) -> Admission | None:
        """The admission rules of a run with these arguments (its weight function applied)."""
        admission = self.throttle_admission
        return None if admission is None else admission.for_run(self.name, args, kwargs)

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
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH or "\x1f" in key:
            raise KeyFunctionError(
                f"task {self.name!r}: its key function {_describe(spec)} returned {key!r}; "
                f"a key must be a non-empty str of at most {MAX_KEY_LENGTH} characters; "
                "the task did not run"
            )
        return key


@overload
def throttled_task(fun: F, /) -> Any: ...


@overload
def throttled_task(
    *, limit: int | Adaptive | None = ..., key: KeySpec = ..., **options: Any
) -> Callable[[F], Any]: ...


def throttled_task(
    fun: Callable[..., Any] | None = None,
    /,
    *,
    limit: int | Adaptive | None = None,
    key: KeySpec = None,
    soft_timeout: float | None = None,
    hard_timeout: float | None = None,
    max_wait: float | None = None,
    on_full: str = "wait",
    retry: RetryPolicy | None = None,
    fallback: Callable[..., Any] | None = None,
    rate: str | float | None = None,
    burst: int | None = None,
    total: int | None = None,
    family: str | None = None,
    weight: int | Callable[..., int] | None = None,
    max_pending: int | None = None,
    **options: Any,
) -> Any:
    """Like ``@shared_task``, with a cluster-wide cap on concurrent runs.

    ``limit``: at most this many runs per key at once across every worker (``None``: no cap),
    or ``Adaptive(initial=…, min=…, max=…)``: a cap that moves with what the downstream says
    (:mod:`celery_throttled.adaptive`).
    ``key``: a string shared by every task type that should share the cap, or a callable
    ``key(*args, **kwargs) -> str`` for one cap per value; default: the task's name.
    ``soft_timeout`` / ``hard_timeout``: seconds, honoured on every pool (Celery's
    ``soft_time_limit`` / ``time_limit``, which are accepted too).
    ``max_wait``, ``on_full``, ``retry``, ``fallback``: see :mod:`celery_throttled.policies`.
    ``rate`` (``burst``), ``total`` (``family``, ``weight``), ``max_pending``: see
    :mod:`celery_throttled.admission`.
    Every other option goes to ``shared_task`` (``name``, ``bind``, ``queue``, ``acks_late``…).
    """

    def create(f: Callable[..., Any]) -> Any:
        name = options.get("name") or f"{f.__module__}.{f.__qualname__}"
        adaptive = limit.checked(name) if isinstance(limit, Adaptive) else None
        cap = adaptive.initial if adaptive is not None else limit
        assert not isinstance(cap, Adaptive)
        validate_limit(name, cap, key, adaptive or cap)
        validate_wait(name, max_wait, on_full, fallback)
        admission = Admission.declare(
            name,
            cap,
            rate=rate,
            burst=burst,
            total=total,
            family=family,
            weight=weight,
            max_pending=max_pending,
            adaptive=adaptive,
        )
        validate_shared(name, key, admission)
        if retry is not None:
            if not isinstance(retry, RetryPolicy):
                raise ConfigurationError(
                    f"task {name!r}: retry must be a RetryPolicy, got {retry!r}"
                )
            options.update(retry.celery_options(name))
        soft = validate_timeout(name, "soft_timeout", soft_timeout, options, "soft_time_limit")
        hard = validate_timeout(name, "hard_timeout", hard_timeout, options, "time_limit")
        if soft is not None and hard is not None and soft >= hard:
            raise ConfigurationError(
                f"task {name!r}: soft_timeout ({soft!r}) must be shorter than hard_timeout "
                f"({hard!r})"
            )
        if soft is not None:
            options["soft_time_limit"] = soft
        if hard is not None:
            options["time_limit"] = hard
        base = options.pop("base", ThrottledTask)
        if not (isinstance(base, type) and issubclass(base, ThrottledTask)):
            raise ConfigurationError(
                f"task {name!r}: base must be a subclass of ThrottledTask, got {base!r}"
            )
        # a function stored on the class would be bound to the task: keep it a plain function
        stored = staticmethod(key) if callable(key) else key
        return shared_task(
            base=base,
            throttle_limit=cap,
            throttle_key=stored,
            throttle_max_wait=max_wait,
            throttle_on_full=on_full,
            throttle_fallback=staticmethod(fallback) if fallback else None,
            throttle_admission=admission,
            throttle_retry=retry,
            **options,
        )(f)

    if fun is not None:
        if not callable(fun):
            raise ConfigurationError(
                f"throttled_task takes its options as keywords, e.g. @throttled_task(limit=5); "
                f"got the positional argument {fun!r}"
            )
        return create(fun)
    return create


def _describe(fun: Any) -> str:
    return getattr(fun, "__qualname__", None) or repr(fun)
