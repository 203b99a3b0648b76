"""The Celery app the test workers run: throttled tasks that record their own concurrency.

Configured from the environment by the test fixtures: ``REDIS_URL`` (limiter, results and,
unless ``BROKER_URL`` is set, the broker), ``TEST_PREFIX`` (the key prefix and queue name that
isolate one test from another), ``LEASE_TTL`` and a few more settings a test may need.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
from datetime import datetime
from typing import Any

import redis
from celery import Celery, shared_task

from celery_throttled import throttled_task

REDIS_URL = os.environ["REDIS_URL"]
PREFIX = os.environ.get("TEST_PREFIX", "t")

app = Celery("throttle_app", broker=os.environ.get("BROKER_URL") or REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=PREFIX,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=int(os.environ.get("PREFETCH", "1")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("VISIBILITY", "3600")),
        # recover a dead worker's unacknowledged messages promptly once they are visible again
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
    throttle_key_prefix=PREFIX,
    throttle_lease_ttl=float(os.environ.get("LEASE_TTL", "30")),
    throttle_redis_url=os.environ.get("LIMITER_URL") or REDIS_URL,
)
app.conf.throttle_max_result_bytes = 1000
if os.environ.get("BROKER_MASTER"):  # Celery's own Sentinel broker settings
    app.conf.broker_transport_options["master_name"] = os.environ["BROKER_MASTER"]
if os.environ.get("LIMITER_URL") == "-":  # no throttle_redis_url: the limiter finds its own
    app.conf.throttle_redis_url = None
if os.environ.get("METRICS_PORT"):
    app.conf.throttle_metrics_port = int(os.environ["METRICS_PORT"])
if os.environ.get("METRICS_ADDR"):
    app.conf.throttle_metrics_addr = os.environ["METRICS_ADDR"]
if os.environ.get("MAX_HELD"):
    app.conf.throttle_max_held = int(os.environ["MAX_HELD"])
if os.environ.get("MAX_HOLD"):
    app.conf.throttle_max_hold = float(os.environ["MAX_HOLD"])
if os.environ.get("PENDING_TTL"):
    app.conf.throttle_pending_ttl = float(os.environ["PENDING_TTL"])
if os.environ.get("PARK"):
    app.conf.throttle_park = os.environ["PARK"] == "1"
if os.environ.get("SOFT_TIME_LIMIT"):  # Celery's own, for every task
    app.conf.task_soft_time_limit = float(os.environ["SOFT_TIME_LIMIT"])

probe = redis.Redis.from_url(REDIS_URL)

_ENTER = probe.register_script(
    """
    local n = redis.call('INCR', KEYS[1])
    local peak = tonumber(redis.call('GET', KEYS[2]) or '0')
    if n > peak then redis.call('SET', KEYS[2], n) end
    redis.call('RPUSH', KEYS[3], ARGV[1])
    return n
    """
)


def tracked(group: str, label: str, duration: float, hold: bool = False) -> str:
    """Count this run in ``group`` (current and peak), sleep (or, with ``hold``, wait until the
    test pushes to ``<prefix>:probe:release``), and log start/end times."""
    base = f"{PREFIX}:probe:{group}"
    _ENTER([f"{base}:now", f"{base}:peak", f"{base}:started"], [f"{label} {time.time()}"])
    try:
        deadline = time.monotonic() + 60
        while hold and not probe.lpop(f"{PREFIX}:probe:release") and time.monotonic() < deadline:
            time.sleep(0.005)  # polled, not BLPOP: a parked waiter is found by its BLPOP
        time.sleep(duration)
    finally:
        probe.decr(f"{base}:now")
        probe.rpush(f"{base}:finished", f"{label} {time.time()}")
    return label


@throttled_task(limit=2, name="t.limited")
def limited(label: str, duration: float = 0.2) -> str:
    return tracked("limited", label, duration)


def _slow_to_report(
    self: Any, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
) -> None:
    """Celery calls this where the body ran, after storing the result and before the worker's
    main process hears of the end: a second here delays that hearing by a second."""
    time.sleep(1.0)
    probe.rpush(f"{PREFIX}:probe:handover:reported", f"{args[0]} {time.time()}")


@throttled_task(limit=1000, key="wide", name="t.wide")
def wide(label: str, duration: float = 0.01) -> str:
    """A cap that never binds here (a thousand slots)."""
    return tracked("wide", label, duration)


@throttled_task(limit=1, key="handover", name="t.handover", after_return=_slow_to_report)
def handover(label: str, duration: float = 0.05) -> str:
    return tracked("handover", label, duration)


@throttled_task(limit=2, key="shared-downstream", name="t.shared_a")
def shared_a(label: str, duration: float = 0.2) -> str:
    return tracked("shared", label, duration)


@throttled_task(limit=2, key="shared-downstream", name="t.shared_b")
def shared_b(label: str, duration: float = 0.2) -> str:
    return tracked("shared", label, duration)


@throttled_task(
    limit=1, key=lambda tenant, *args, **kwargs: f"tenant:{tenant}", name="t.per_tenant"
)
def per_tenant(tenant: str, label: str, duration: float = 0.2) -> str:
    return tracked(f"tenant:{tenant}", label, duration)


@throttled_task(limit=1, key=lambda *a, **k: 1 / 0, name="t.bad_key")  # type: ignore[arg-type]
def bad_key(label: str) -> str:
    return tracked("bad_key", label, 0)


@throttled_task(limit=1, key=lambda *a, **k: 42, name="t.non_string_key")  # type: ignore[arg-type]
def non_string_key(label: str) -> str:
    return tracked("non_string_key", label, 0)


@throttled_task(limit=None, name="t.uncapped")
def uncapped(label: str, duration: float = 0.2) -> str:
    return tracked("uncapped", label, duration)


@shared_task(name="t.plain")
def plain(label: str, duration: float = 0.05) -> str:
    return tracked("plain", label, duration)


@throttled_task(limit=1, key="fragile", name="t.suicide")
def suicide(label: str) -> str:
    tracked("suicide", label, 0)
    os.kill(os.getpid(), 9)
    return label


@throttled_task(limit=1, key="fragile", name="t.survivor")
def survivor(label: str, duration: float = 0.0, hold: bool = False) -> str:
    return tracked("fragile", label, duration, hold)


@throttled_task(limit=1, name="t.flaky", bind=True, max_retries=3, default_retry_delay=0.1)
def flaky(self: Any, label: str) -> str:
    tracked("flaky", f"{label}#{self.request.retries}", 0)
    if self.request.retries < 2:
        raise self.retry()
    return label


@shared_task(name="t.collect")
def collect(values: list[str]) -> list[str]:
    return sorted(values)


@throttled_task(limit=1, name="t.rate_limited", rate_limit="20/s")
def rate_limited(label: str) -> str:
    return tracked("rate_limited", label, 0)


@throttled_task(limit=1, name="t.late", acks_late=True)
def late(label: str, duration: float = 0.1) -> str:
    return tracked("late", label, duration)


@throttled_task(limit=2, key="t.limited", name="t.limited_late", acks_late=True)
def limited_late(label: str, duration: float = 0.2) -> str:
    """t.limited's key and cap, acknowledged only once it ends (its message fills the window)."""
    return tracked("limited", label, duration)


@throttled_task(limit=1, name="t.fair", bind=True)
def fair(self: Any, index: int, duration: float = 0.05) -> str:
    return tracked("fair", f"{index}@{self.request.hostname}", duration)


# -- the panic matrix ---------------------------------------------------------------------------
class PickyError(Exception):
    """Several required and keyword-only arguments, and an unpicklable lock."""

    def __init__(self, code: int, reason: str, *, retry_after: float) -> None:
        super().__init__(f"{code} {reason}")
        self.lock = threading.Lock()
        self.retry_after = retry_after


def _recurse(n: int) -> int:
    return _recurse(n + 1) + 1


PANICS: dict[str, Any] = {
    "ok": lambda: {"fine": True},
    "error": lambda: (_ for _ in ()).throw(ValueError("boom")),
    "picky": lambda: (_ for _ in ()).throw(PickyError(503, "busy", retry_after=1.5)),
    "system_exit": lambda: sys.exit(3),
    "keyboard_interrupt": lambda: (_ for _ in ()).throw(KeyboardInterrupt()),
    "generator_exit": lambda: (_ for _ in ()).throw(GeneratorExit()),
    "memory_error": lambda: (_ for _ in ()).throw(MemoryError()),
    "recursion": lambda: _recurse(0),
    "set": lambda: {1, 2},
    "object": lambda: object(),
    "bytes": lambda: b"raw",
    "too_large": lambda: "x" * 5000,
    "os_exit": lambda: os._exit(1),
    "sigkill": lambda: os.kill(os.getpid(), 9),
    "segfault": lambda: ctypes.string_at(0),
}


def _chained() -> None:
    try:
        raise KeyError("inner")
    except KeyError as exc:
        raise RuntimeError("outer") from exc


PANICS["chained"] = _chained


@throttled_task(limit=4, name="t.panic")
def panic(case: str) -> Any:
    return PANICS[case]()


@throttled_task(limit=1, key="sleepy", name="t.sleeper")
def sleeper(label: str, seconds: float, step: float = 0.01, catch: bool = False) -> str:
    """Sleep in small steps (a soft timeout lands between them on any pool); log the span."""
    from celery.exceptions import SoftTimeLimitExceeded

    base = f"{PREFIX}:probe:sleepy"
    probe.rpush(f"{base}:started", f"{label} {time.time()}")
    end = time.time() + seconds
    try:
        while time.time() < end:
            time.sleep(step)
    except SoftTimeLimitExceeded:
        if catch:
            return "cleaned up"
        raise
    finally:
        probe.rpush(f"{base}:finished", f"{label} {time.time()}")
    return "slept"


@throttled_task(limit=4, name="t.report_deadline")
def report_deadline() -> float | None:
    from celery_throttled import current_context

    return current_context().deadline


@throttled_task(limit=4, name="t.spawn")
def spawn(child_deadline: float | None = None) -> dict[str, Any]:
    """Submit a child throttled task from inside a throttled task; say what each saw."""
    from celery_throttled import current_context

    options = {} if child_deadline is None else {"deadline": child_deadline}
    child = report_deadline.apply_async(**options)
    return {"mine": current_context().deadline, "child_id": child.id}


# -- wait and failure policies --------------------------------------------------------------
from celery_throttled.policies import RetryPolicy  # noqa: E402


@throttled_task(limit=1, key="sleepy", on_full="reject", name="t.reject_when_full")
def reject_when_full(label: str) -> str:
    return tracked("sleepy_policy", label, 0)


@throttled_task(limit=1, key="sleepy", max_wait=0.3, name="t.impatient")
def impatient(label: str) -> str:
    return tracked("sleepy_policy", label, 0)


@throttled_task(
    limit=1,
    key="policy",
    name="t.retrying",
    bind=True,
    retry=RetryPolicy(max_attempts=3, on=(OSError,), backoff=0.6, jitter=False),
)
def retrying(self: Any, label: str) -> str:
    tracked("policy", f"{label}#{self.request.retries}", 0.05)
    retries = f"{PREFIX}:probe:policy:retries"  # when each retry was asked for, and its eta
    if self.request.eta:
        eta = datetime.fromisoformat(str(self.request.eta)).timestamp()
        probe.rpush(retries, json.dumps({"eta": eta, "retries": self.request.retries}))
    if self.request.retries < 2:
        probe.rpush(retries, json.dumps({"asked": time.time(), "retries": self.request.retries}))
        raise OSError("downstream hiccup")
    return label


@throttled_task(limit=1, key="policy", name="t.policy_quick")
def policy_quick(label: str) -> str:
    return tracked("policy", label, 0)


def _cached_price(error: Any, sku: str) -> dict[str, Any]:
    return {"sku": sku, "price": 9.99, "stale": True, "because": error.type}


@throttled_task(limit=2, name="t.degrading", fallback=_cached_price)
def degrading(sku: str) -> dict[str, Any]:
    raise ValueError(f"pricing service down for {sku}")


# -- errgroups ------------------------------------------------------------------------------
from celery_throttled import current_context, errgroup  # noqa: E402


def _member_run(label: str, seconds: float, fail_after: float | None, poll: bool) -> str:
    """Count the start (and current/peak), work in 20 ms steps, fail or finish."""
    base = f"{PREFIX}:probe:eg"
    _ENTER([f"{base}:now", f"{base}:peak", f"{base}:started"], [f"{label} {time.time()}"])
    began = time.time()
    try:
        while time.time() < began + seconds:
            if fail_after is not None and time.time() >= began + fail_after:
                raise RuntimeError(f"member {label} failed")
            if poll:
                current_context().check()  # like select { case <-ctx.Done(): }
            time.sleep(0.02)
    finally:
        probe.decr(f"{base}:now")
        probe.rpush(f"{base}:finished", f"{label} {time.time()}")
    if fail_after is not None:
        raise RuntimeError(f"member {label} failed")
    return label


@throttled_task(limit=8, key="members", name="t.member")
def member(
    label: str, seconds: float = 0.1, fail_after: float | None = None, poll: bool = True
) -> str:
    return _member_run(label, seconds, fail_after, poll)


@throttled_task(limit=None, name="t.free_member")
def free_member(
    label: str, seconds: float = 0.1, fail_after: float | None = None, poll: bool = True
) -> str:
    return _member_run(label, seconds, fail_after, poll)


@throttled_task(limit=2, key="fragile-members", name="t.member_suicide")
def member_suicide(label: str) -> str:
    probe.rpush(f"{PREFIX}:probe:eg:started", f"{label} {time.time()}")
    os.kill(os.getpid(), 9)
    return label


@shared_task(name="t.summarize")
def summarize(values: list[Any]) -> int:
    probe.rpush(f"{PREFIX}:probe:eg:body", json.dumps(values))
    return len(values)


@shared_task(name="t.report_error")
def report_error(envelope: dict[str, Any]) -> None:
    probe.rpush(f"{PREFIX}:probe:eg:errback", json.dumps(envelope))


@throttled_task(limit=4, name="t.nest")
def nest(labels: list[str], seconds: float = 30.0) -> list[Any]:
    """Start a child errgroup and wait for it, leaving when this run is cancelled."""
    child = errgroup([member.s(label, seconds) for label in labels]).apply_async()
    probe.set(f"{PREFIX}:probe:eg:child", child.id)
    ctx = current_context()
    while not child.ready():
        ctx.check()
        time.sleep(0.02)
    if child.cancelled:
        # cancelled from above: this run's own cancellation is on its way (the context asks
        # Redis at most every 50 ms, so the child may settle first)
        deadline = time.monotonic() + 2.0
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        ctx.check()
    return child.unwrap()


@throttled_task(limit=4, name="t.nest_deadline")
def nest_deadline(count: int) -> list[Any]:
    """An errgroup started inside a task with a deadline: what deadline its members see."""
    return errgroup([report_deadline.s() for _ in range(count)]).apply_async().unwrap(30)


# -- blocking calls and decorator-level timeouts ------------------------------------------------
import contextlib  # noqa: E402
import socket  # noqa: E402


def _block(seconds: float, how: str) -> None:
    """One blocking call of ``seconds``: a single ``time.sleep``, or a socket read no data ends."""
    if how == "recv":
        a, b = socket.socketpair()
        with a, b:
            a.settimeout(seconds)
            with contextlib.suppress(TimeoutError):
                a.recv(1)
    else:
        time.sleep(seconds)


def _blocked_run(group: str, label: str, seconds: float, how: str) -> str:
    """Log the start, block in one call, log whether the call returned, and the end."""
    base = f"{PREFIX}:probe:{group}"
    probe.rpush(f"{base}:started", f"{label} {time.time()}")
    try:
        _block(seconds, how)
        probe.rpush(f"{base}:returned", f"{label} {time.time()}")
    finally:
        probe.rpush(f"{base}:finished", f"{label} {time.time()}")
    return "blocked"


@throttled_task(limit=1, key="blocking", name="t.blocker")
def blocker(label: str, seconds: float, how: str = "sleep") -> str:
    return _blocked_run("blocking", label, seconds, how)


@throttled_task(limit=1, key="timed", soft_timeout=0.5, name="t.timed_soft")
def timed_soft(label: str, seconds: float) -> str:
    """Declares soft_timeout=0.5 on the decorator; sleeps in 10 ms steps."""
    base = f"{PREFIX}:probe:timed"
    probe.rpush(f"{base}:started", f"{label} {time.time()}")
    end = time.time() + seconds
    try:
        while time.time() < end:
            time.sleep(0.01)
    finally:
        probe.rpush(f"{base}:finished", f"{label} {time.time()}")
    return "slept"


@throttled_task(limit=1, key="timed", hard_timeout=0.6, name="t.timed_hard")
def timed_hard(label: str, seconds: float) -> str:
    """Declares hard_timeout=0.6 on the decorator; blocks in one call."""
    return _blocked_run("timed", label, seconds, "sleep")


# -- outcomes: causes, deadlines seen from inside, fallbacks, errbacks --------------------------
@throttled_task(limit=2, name="t.deep_chain")
def deep_chain(depth: int) -> None:
    """Raise a chain of ``depth`` exceptions: ``E0 from E1 from … E{depth-1}``."""
    error: BaseException | None = None
    for level in reversed(range(depth)):
        try:
            raise ValueError(f"level {level}") from error
        except ValueError as exc:
            error = exc
    assert error is not None
    raise error


@throttled_task(limit=2, name="t.deadline_probe")
def deadline_probe(label: str) -> str:
    """Record remaining() before the deadline; sleep through it (catching the soft limit it
    becomes), record remaining() again, then call check()."""
    from celery.exceptions import SoftTimeLimitExceeded

    ctx = current_context()
    base = f"{PREFIX}:probe:context:{label}"
    probe.rpush(base, json.dumps({"deadline": ctx.deadline, "remaining": ctx.remaining()}))
    try:
        while not ctx.expired():
            time.sleep(0.01)
    except SoftTimeLimitExceeded:
        while not ctx.expired():  # the soft limit may fire a little early
            time.sleep(0.01)
    probe.rpush(base, json.dumps({"remaining": ctx.remaining(), "cancelled": ctx.cancelled}))
    ctx.check()
    return "check() did not raise"


def _failing_fallback(error: Any, sku: str) -> Any:
    raise LookupError(f"no cached price for {sku}")


@throttled_task(limit=2, name="t.fallback_fails", fallback=_failing_fallback)
def fallback_fails(sku: str) -> Any:
    raise ValueError(f"pricing service down for {sku}")


def _stand_in(error: Any, *args: Any, **kwargs: Any) -> str:
    return "degraded"


@throttled_task(limit=1, key="fallback-blocking", name="t.fallback_blocker", fallback=_stand_in)
def fallback_blocker(label: str, seconds: float) -> str:
    """Block in one call for ``seconds``, then fail (so a fallback would stand in)."""
    _blocked_run("fallback", label, seconds, "sleep")
    raise ValueError(f"{label} failed late")


@throttled_task(limit=1, key="fallback-blocking", name="t.fallback_suicide", fallback=_stand_in)
def fallback_suicide(label: str) -> str:
    probe.rpush(f"{PREFIX}:probe:fallback:started", f"{label} {time.time()}")
    os.kill(os.getpid(), 9)
    return label


@shared_task(name="t.record_errback")
def record_errback(task_id: str) -> None:
    """An old-style errback (``link_error``): it gets the failed task's id."""
    probe.rpush(f"{PREFIX}:probe:errbacks", task_id)


# -- errgroup promises ----------------------------------------------------------------------------
@throttled_task(limit=4, name="t.nest_then_fail")
def nest_then_fail(labels: list[str], seconds: float = 30.0) -> None:
    """Start a child errgroup, wait until its members run, then fail (not as an errgroup member)."""
    child = errgroup([member.s(label, seconds) for label in labels]).apply_async()
    probe.set(f"{PREFIX}:probe:eg:child", child.id)
    began = time.time()
    while probe.llen(f"{PREFIX}:probe:eg:started") < len(labels) and time.time() < began + 20:
        time.sleep(0.02)
    raise RuntimeError("the parent task failed")


@throttled_task(limit=2, name="t.quiet", ignore_result=True)
def quiet(label: str) -> str:
    return label


# the flow-control tasks (rates, families, priorities, max_pending), and the adaptive-cap tasks
# with their fragile downstream: their own modules
from . import adaptive_app, flow_app  # noqa: E402, F401
