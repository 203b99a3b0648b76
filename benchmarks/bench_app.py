"""The Celery app the benchmark workers run: throttled and plain tasks, and the two recipes.

Configured from the environment by ``bench_cap.py`` and ``soak.py``: ``REDIS_URL`` (broker,
result backend, and the limiter unless ``LIMITER_URL`` is set), ``BENCH_PREFIX`` (the queue name
and ``throttle_key_prefix`` that isolate one row from another) and ``LEASE_TTL``. Every task
that does work counts itself in Redis while its body runs, so a row's peak concurrency is
measured inside the tasks, never inferred::

    {prefix}:probe:{group}:now     INCR on entry, DECR on exit
    {prefix}:probe:{group}:peak    the highest value ``now`` ever reached (set atomically)
    {prefix}:probe:{group}:spans   "<start> <end>" (epoch seconds) of every run

The two recipes are what people write by hand without this package; their slot counter is
``{prefix}:recipe:{name}:slots``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import redis
from celery import Celery, shared_task

from celery_throttled import throttled_task

REDIS_URL = os.environ["REDIS_URL"]
PREFIX = os.environ.get("BENCH_PREFIX", "bench")

#: The caps of the rows; ``bench_cap.py`` reads them from here.
NEVER_BINDS = 10_000
WORK_CAP = 5
HANDOFF_CAP = 1

app = Celery("bench_app", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=PREFIX,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    throttle_redis_url=os.environ.get("LIMITER_URL") or REDIS_URL,
    throttle_key_prefix=PREFIX,
    throttle_lease_ttl=float(os.environ.get("LEASE_TTL", "30")),
)
if os.environ.get("BENCH_PARK"):  # bench_cap's parked rows; the default (off) otherwise
    app.conf.throttle_park = os.environ["BENCH_PARK"] == "1"

probe = redis.Redis.from_url(REDIS_URL)

_ENTER = probe.register_script(
    """
    local n = redis.call('INCR', KEYS[1])
    local peak = tonumber(redis.call('GET', KEYS[2]) or '0')
    if n > peak then redis.call('SET', KEYS[2], n) end
    return n
    """
)

# KEYS[1] - the recipe's slot counter; ARGV[1] - its limit; returns 1 (took a slot) or 0 (full)
_TAKE_SLOT = probe.register_script(
    """
    local n = tonumber(redis.call('GET', KEYS[1]) or '0')
    if n < tonumber(ARGV[1]) then
      redis.call('INCR', KEYS[1])
      return 1
    end
    return 0
    """
)


def probe_key(group: str, what: str) -> str:
    return f"{PREFIX}:probe:{group}:{what}"


def slots_key(recipe: str) -> str:
    return f"{PREFIX}:recipe:{recipe}:slots"


@contextlib.contextmanager
def counted(group: str) -> Iterator[None]:
    """Count the enclosed block in ``group``'s current and peak concurrency; log its span."""
    now = probe_key(group, "now")
    _ENTER([now, probe_key(group, "peak")])
    start = time.time()
    try:
        yield
    finally:
        end = time.time()
        pipe = probe.pipeline(transaction=False)
        pipe.decr(now)
        pipe.rpush(probe_key(group, "spans"), f"{start} {end}")
        pipe.execute()


# -- P1: no-op throughput -------------------------------------------------------------------
@shared_task(name="bench.noop_plain")
def noop_plain(track: bool = False) -> None:
    if track:
        with counted("noop_plain"):
            pass


@throttled_task(limit=NEVER_BINDS, name="bench.noop_throttled")
def noop_throttled(track: bool = False) -> None:
    if track:
        with counted("noop_throttled"):
            pass


# -- P2, P3: 50 ms of work -----------------------------------------------------------------
@shared_task(name="bench.work_plain")
def work_plain(duration: float) -> None:
    with counted("work_plain"):
        time.sleep(duration)


@throttled_task(limit=WORK_CAP, bind=True, name="bench.work_throttled")
def work_throttled(self: Any, duration: float) -> None:
    with counted("work_throttled"):
        start = time.time()
        time.sleep(duration)
    end = time.time()  # as P4's: after the probe's own round trip, the body's last line
    _log(self.request, "work_throttled", {"start": start, "end": end})


@shared_task(bind=True, max_retries=None, name="bench.recipe_retry")
def recipe_retry(self: Any, duration: float, limit: int) -> None:
    """Recipe (a): take a slot of a Redis counter, or retry in 100 ms, without end.

    ``max_retries=None`` must be on the decorator: passed to ``self.retry()`` it means "the
    task's default" (3), and the fourth retry fails with ``MaxRetriesExceededError``.
    """
    slots = slots_key("retry")
    if not _TAKE_SLOT([slots], [limit]):
        probe.incr(f"{PREFIX}:recipe:retry:retries")
        raise self.retry(countdown=0.1)
    try:
        with counted("recipe_retry"):
            time.sleep(duration)
    finally:
        probe.decr(slots)


@shared_task(bind=True, name="bench.recipe_spin")
def recipe_spin(self: Any, duration: float, limit: int) -> None:
    """Recipe (b): take a slot of a Redis counter, spinning every 10 ms until one is free."""
    slots = slots_key("spin")
    while not _TAKE_SLOT([slots], [limit]):
        time.sleep(0.01)
    try:
        with counted("recipe_spin"):
            time.sleep(duration)
    finally:
        probe.decr(slots)


# -- P4: hand-off between workers ----------------------------------------------------------
@throttled_task(limit=HANDOFF_CAP, bind=True, name="bench.handoff")
def handoff(self: Any, label: int, duration: float) -> None:
    """Sleep under a cap of one; log when the body started and ended, on which worker, and when
    it was admitted (:func:`_log`)."""
    with counted("handoff"):
        start = time.time()
        time.sleep(duration)
    end = time.time()
    _log(self.request, "handoff", {"label": label, "start": start, "end": end})


def _log(request: Any, group: str, event: dict[str, Any]) -> None:
    """Log a body's span, its worker and when it was admitted (``admitted_at`` in the
    ``throttle`` header: by its worker, or where a parked waiter's grant arrived). The log
    waits until the slot is freed (:func:`_log_after_free`): sent before, its round trip would
    delay every hand-off, which the recipes' rows do not pay."""
    event["id"], event["host"] = request.id, request.hostname
    event["admitted"] = (getattr(request, "throttle", None) or {}).get("admitted_at")
    _events.append((group, event))


_events: list[tuple[str, dict[str, Any]]] = []
_split = bool(os.environ.get("BENCH_SPLIT"))


def _log_after_free() -> None:
    """The bodies' logs go once the pool process has freed the slot, off the hand-off's path;
    with ``BENCH_SPLIT`` (P5's split of a hand-off) each says when the slot was freed."""
    from celery_throttled.pool import release

    free = release.free

    def free_then_log(task: Any, request: Any, outcome: str, ran: bool = True) -> None:
        free(task, request, outcome, ran)
        freed = time.time()
        if not _events:
            return
        pipe = probe.pipeline(transaction=False)
        for group, event in _events:
            if _split:
                event["freed"] = freed
            pipe.rpush(probe_key(group, "events"), json.dumps(event))
        pipe.execute()
        _events.clear()

    release.free = free_then_log


_log_after_free()


# -- P7: errgroup against a plain chord -----------------------------------------------------
def _sibling(label: str, seconds: float, fail_after: float | None, poll: bool) -> str:
    """Work for ``seconds`` in 10 ms steps (or fail after ``fail_after``); log start and end."""
    from celery_throttled import current_context

    probe.rpush(probe_key("p7", "starts"), f"{label} {time.time()}")
    began = time.time()
    try:
        while time.time() < began + seconds:
            if fail_after is not None and time.time() >= began + fail_after:
                raise RuntimeError(f"sibling {label} failed")
            if poll:
                current_context().check()
            time.sleep(0.01)
    finally:
        probe.rpush(probe_key("p7", "ends"), f"{label} {time.time()}")
    return label


@shared_task(name="bench.sibling_plain")
def sibling_plain(label: str, seconds: float, fail_after: float | None = None) -> str:
    return _sibling(label, seconds, fail_after, poll=False)


@throttled_task(limit=None, name="bench.sibling")
def sibling(label: str, seconds: float, fail_after: float | None = None, poll: bool = False) -> str:
    return _sibling(label, seconds, fail_after, poll)


@shared_task(name="bench.chord_body")
def chord_body(values: list[Any]) -> int:
    return len(values)


# -- the soak run (soak.py) -----------------------------------------------------------------
SOAK_CAP = 3


def _soak_body(group: str, label: str, duration: float) -> str:
    """Log the body's start (with this process's pid) and end. A counter would drift here:
    a SIGKILLed process never decrements it; ``soak.py`` ends a killed body at its kill."""
    pipe = probe.pipeline(transaction=False)
    pipe.hincrby(probe_key("soak", "runs"), label, 1)  # a body that runs twice shows here
    pipe.rpush(probe_key(group, "starts"), f"{label} {os.getpid()} {time.time()}")
    pipe.execute()
    try:
        time.sleep(duration)
    finally:
        probe.rpush(probe_key(group, "ends"), f"{label} {time.time()}")
    return label


@throttled_task(limit=SOAK_CAP, key="soak", name="bench.soak_capped")
def soak_capped(label: str, duration: float) -> str:
    return _soak_body("soak", label, duration)


@throttled_task(limit=SOAK_CAP, key="soak", name="bench.soak_failing")
def soak_failing(label: str, duration: float) -> str:
    _soak_body("soak", label, duration)
    raise RuntimeError(f"{label} failed on purpose")


@throttled_task(
    limit=1, key=lambda tenant, *args, **kwargs: f"tenant-{tenant}", name="bench.soak_tenant"
)
def soak_tenant(tenant: int, label: str, duration: float) -> str:
    return _soak_body(f"tenant-{tenant}", label, duration)


@throttled_task(limit=None, name="bench.soak_free")
def soak_free(label: str, duration: float) -> str:
    return _soak_body("free", label, duration)


# -- the scale run (bench_scale.py) -----------------------------------------------------------
SCALE_CAP = 5


@throttled_task(limit=SCALE_CAP, key="scale", name="bench.scale_capped")
def scale_capped(duration: float) -> None:
    with counted("scale"):
        time.sleep(duration)


@throttled_task(
    limit=1, key=lambda tenant, *args, **kwargs: f"tenant-{tenant}", name="bench.scale_tenant"
)
def scale_tenant(tenant: int, duration: float) -> None:
    time.sleep(duration)


# -- bench_flow.py (rates, fair shares, backpressure) and bench_adaptive.py (adaptive caps and
# their downstream): their own modules
from benchmarks import adaptive_app, flow_app  # noqa: E402, F401
