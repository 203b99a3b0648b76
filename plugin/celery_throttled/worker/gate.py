"""Per-worker waiting lines: hold a throttled request until the cluster grants it a slot.

The data path, all on the worker's main process::

    message -> strategy -> Gate.route -> (limit set?) -> Gate.submit: hold, unacknowledged
            -> Acquire (the transport: on the event loop, or two threads) -> granted now,
               or later by a release anywhere in the cluster
            -> Gate._admit on the event loop -> the pool runs the task
            -> on_success / on_failure / hard timeout / revoke / cancel -> Gate.release

A held request occupies no pool process or thread, is not re-published and costs no retry.
Each one that has to wait widens the prefetch window by one (up to ``throttle_max_held``) so
that unrelated tasks on the same queue keep flowing. Held requests are checked every
``throttle_sweep_interval``: a revoked or expired one is discarded as Celery would, and one
held longer than ``throttle_max_hold`` is handed back to the broker before the broker's own
redelivery timeout could make it run twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import redis
from celery.worker import state as worker_state

from .. import request as protocol
from .. import transport
from ..errgroup.flow import write_cancelled
from ..errgroup.store import GroupStore
from ..errors import KeyFunctionError
from ..keys import ERRGROUP_KEY_PREFIX, holder_id
from ..metrics import Metrics
from ..settings import Settings
from ..task import ThrottledTask
from ..topology import mask
from ..transport.leases import Acquire, RedisLeases, Release, Renew
from .endpaths import hook_end_paths
from .outcomes import deadline_passed, never_runs, rejected, report_lost

__all__ = ["Gate"]

logger = logging.getLogger(__name__)


class Held:
    """One request this worker holds or runs under a lease."""

    __slots__ = (
        "admitted_at",
        "cap",
        "holder",
        "key",
        "next_cap",
        "outer",
        "released",
        "req",
        "since",
        "waited",
        "widened",
    )

    def __init__(self, req: Any, key: str, cap: int, holder: str) -> None:
        self.req = req
        self.key = key
        self.cap = cap
        self.holder = holder
        self.since = time.monotonic()
        self.widened = False
        self.released = False
        self.waited: float | None = None
        self.admitted_at: float | None = None
        #: the slot held while this one is waited for (an errgroup's own limit)
        self.outer: Held | None = None
        #: once this slot is granted, the task's own cap to wait for next
        self.next_cap: int | None = None


class Gate:
    """The waiting lines of one worker consumer."""

    @classmethod
    def for_consumer(cls, consumer: Any) -> Gate:
        gate: Gate | None = protocol.GATE.get(consumer)
        if gate is None:
            gate = cls(consumer)
            protocol.GATE.set(consumer, gate)
        return gate

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.settings = settings = Settings.from_app(consumer.app)
        host = str(consumer.hostname).replace(" ", "_")
        self.worker = f"{host}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        client = settings.client(
            socket_timeout=5, socket_connect_timeout=2, health_check_interval=10
        )
        self.store = RedisLeases(client, settings.key_prefix, settings.lease_ttl, self.worker)
        self.groups = GroupStore(client, settings.key_prefix, settings.errgroup_ttl)
        callbacks = transport.Callbacks(
            self.snapshot, self.granted, self.lost, self.waiting, self.group_cancelled
        )
        self.transport = transport.build(
            settings,
            hub=consumer.hub,
            store=self.store,
            client=client,
            worker=self.worker,
            callbacks=callbacks,
        )
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, str], Held] = {}
        self._running: dict[tuple[str, str], Held] = {}
        self._caps: dict[str, int] = {}
        #: requests holding or waiting for a slot of each key (held here, not yet released)
        self._uses: Counter[str] = Counter()
        self._grants: deque[tuple[str, str]] = deque()
        self._drain_scheduled = False
        self._widened = 0
        self._closed = False
        self._sweeper: Any = None
        self.metrics: Metrics | None = None
        if settings.metrics_port is not None:
            self.metrics = Metrics(self._metric_counts)
            self.metrics.serve(settings.metrics_port, settings.metrics_addr)
        self.pool_kind = _pool_kind(consumer.pool)
        self._dispatch: Callable[[Any], Any] = consumer.on_task_request
        consumer.on_task_request = self.route
        self._loop_thread = threading.get_ident()
        logger.info(
            "celery-throttled: worker %s uses the limiter at %s (prefix %r, lease TTL %.1fs, "
            "through the %s)",
            self.worker,
            mask(settings.redis_url),
            settings.key_prefix,
            settings.lease_ttl,
            self.transport.name,
        )

    # -- the event loop side -----------------------------------------------------------------
    def route(self, req: Any) -> Any:
        """Replaces ``consumer.on_task_request``: every request path (direct, ETA, rate limit)."""
        task = req.task
        if not isinstance(task, ThrottledTask) or protocol.ADMITTED.get(req):
            return self._dispatch(req)
        protocol.INFO.set(req, {"pool": self.pool_kind})
        if _deadline_passed(req):
            deadline_passed(req, "while it was queued")
            return None
        limit = task.throttle_limit
        group = protocol.group(req)
        if group is not None and group.get("limit"):
            # an errgroup's own limit first, then the task's cap (always in that order)
            return self.submit(
                req, int(group["limit"]), key=ERRGROUP_KEY_PREFIX + group["id"], then=limit
            )
        if limit is None:
            if not self._may_start(req, None):
                return None
            return self._run(req)
        return self.submit(req, limit)

    def _run(self, req: Any) -> Any:
        deadline = protocol.deadline(req)
        if deadline is not None:  # the time left acts as the soft time limit
            hard, soft = req.time_limits
            left = max(deadline - time.time(), 0.001)
            soft = soft or req.task.soft_time_limit
            req.time_limits = (hard, left if soft is None else min(soft, left))
        protocol.ADMITTED.set(req, True)
        return self._dispatch(req)

    def submit(
        self,
        req: Any,
        cap: int,
        *,
        key: str | None = None,
        then: int | None = None,
        outer: Held | None = None,
    ) -> None:
        """Wait for a slot of ``key`` (default: the task's key), holding ``outer`` meanwhile."""
        if key is None:
            try:
                key = req.task.throttle_key_for(req.args, req.kwargs)
            except KeyFunctionError as exc:
                logger.error("%s", exc)
                if outer is not None:
                    self.release(outer)
                never_runs(req, exc)
                return
            protocol.info(req)["key"] = key
        holder = holder_id(self.worker, req.id)
        held = Held(req, key, cap, holder)
        held.outer, held.next_cap = outer, then
        with self._lock:
            n = 1
            while (key, held.holder) in self._waiting or (key, held.holder) in self._running:
                n += 1
                held.holder = f"{holder}#{n}"
            self._waiting[(key, held.holder)] = held
            new_key = key not in self._caps
            self._caps[key] = cap
            self._uses[key] += 1
        if new_key:
            self.transport.register(key)
        self.transport.submit(Acquire(key, held.holder, cap))

    def waiting(self, key: str, holder: str) -> None:
        """No slot for ``holder`` right now: it waits, so widen the prefetch window by one.

        Only requests that really wait widen it: an uncontended acquire costs no QoS change.
        """
        if threading.get_ident() != self._loop_thread:
            self._on_loop(self.waiting, key, holder)  # from the threaded transport
            return
        with self._lock:
            held = self._waiting.get((key, holder))
        if held is not None and held.req.task.throttle_on_full == "reject":
            self._reject(held, f"no slot of {key!r} was free (on_full='reject')")
            return
        if held is not None and not held.widened and self._widened < self.settings.max_held:
            self.consumer.qos.increment_eventually()
            self._widened += 1
            held.widened = True

    def granted(self, key: str, holder: str) -> None:
        """A slot was granted to ``holder``; called from any thread."""
        if threading.get_ident() == self._loop_thread:
            self._grant(key, holder)
            return
        with self._lock:
            self._grants.append((key, holder))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        self._on_loop(self._drain)

    def _on_loop(self, fun: Callable[..., Any], *args: Any) -> None:
        """Run ``fun`` on the consumer's loop thread (from any thread)."""
        hub = self.consumer.hub
        if hub is not None:
            hub.call_soon(fun, *args)
        else:
            self.consumer.timer.call_after(0, fun, args)

    def _drain(self) -> None:
        with self._lock:
            self._drain_scheduled = False
            grants = list(self._grants)
            self._grants.clear()
        for key, holder in grants:
            self._grant(key, holder)

    def _grant(self, key: str, holder: str) -> None:
        with self._lock:
            held = self._waiting.pop((key, holder), None)
            running = (key, holder) in self._running
            cap = self._caps.get(key, 1)
        if held is not None:
            self._admit(held)
        elif not running:
            # Granted to a request this worker no longer holds (revoked, handed back,
            # or dropped on reconnect): give the slot straight back.
            self.transport.submit(Release(key, holder, cap))

    def _admit(self, held: Held) -> None:
        self._unwiden(held)
        req = held.req
        if self._closed:
            self._give_back(held)
            return
        if req.revoked():
            self.release(held)
            return
        if _deadline_passed(req):
            self.release(held)
            deadline_passed(req, f"while it waited for a slot of {held.key!r}")
            return
        if held.next_cap is not None:  # the errgroup's slot is ours: now the task's own cap
            with self._lock:
                self._running[(held.key, held.holder)] = held
            self.submit(req, held.next_cap, outer=held)
            return
        if not self._may_start(req, held):
            return
        held.admitted_at = time.monotonic()
        held.waited = held.admitted_at - held.since
        if self.metrics is not None:
            self.metrics.admitted(held.key, held.waited)
        protocol.info(req)["waited"] = held.waited
        with self._lock:
            self._running[(held.key, held.holder)] = held
        hook_end_paths(req, lambda outcome: self.release(held, outcome))
        protocol.SLOT.set(req, True)
        self._run(req)
        self._jump_pool_queue(req)

    def _jump_pool_queue(self, req: Any) -> None:
        """A request holding a cluster-wide slot goes ahead of unthrottled ones in the pool queue.

        When every pool process is busy, Celery queues requests in the worker's semaphore, first
        come first served; a granted request waiting there would keep its slot idle while
        unthrottled work runs. It moves behind the other slot holders, ahead of the rest.
        """
        semaphore = getattr(self.consumer.controller, "semaphore", None)
        waiting = getattr(semaphore, "_waiting", None)
        if not waiting:
            return
        entry = waiting[-1]
        if len(entry) < 2 or not entry[1] or entry[1][0] is not req:
            return
        waiting.pop()
        position = 0
        while position < len(waiting) and _holds_slot(waiting[position]):
            position += 1
        waiting.insert(position, entry)

    def release(self, held: Held, outcome: str = "") -> None:
        """Give the slot (or the place in line) back, and the errgroup's slot held with it.

        Idempotent; called from any thread. ``outcome`` ("done", "failed", "retried") is counted
        per key for ``celery throttle``.
        """
        with self._lock:
            if held.released:
                return
            held.released = True
            self._running.pop((held.key, held.holder), None)
            self._waiting.pop((held.key, held.holder), None)
            self._uses[held.key] -= 1
            if self._uses[held.key] <= 0:
                del self._uses[held.key]
                if held.key.startswith(ERRGROUP_KEY_PREFIX):
                    self._caps.pop(held.key, None)  # one-off keys must not pile up
        self.transport.submit(Release(held.key, held.holder, held.cap, outcome, held.waited))
        if held.outer is not None:
            self.release(held.outer, outcome)
        if self.metrics is not None:
            ran = None if held.admitted_at is None else time.monotonic() - held.admitted_at
            self.metrics.ended(held.key, outcome, ran)

    def sweep(self) -> None:
        """Discard revoked or expired held requests, and members of cancelled errgroups; hand
        back ones held too long."""
        revoked_ids = worker_state.revoked
        check_stamps = bool(worker_state.revoked_stamps)
        now = time.monotonic()
        oldest = now - self.settings.max_hold
        with self._lock:
            waiting = list(self._waiting.values())
        waiting = self._drop_cancelled_members(waiting)
        for held in waiting:
            req = held.req
            if req.id in revoked_ids or check_stamps or _expired(req):
                if req.revoked():
                    self._unwiden(held)
                    self.release(held)
            elif _deadline_passed(req):
                self._unwiden(held)
                self.release(held)
                deadline_passed(req, f"while it waited for a slot of {held.key!r}")
            elif req.task.throttle_max_wait is not None and (
                now - held.since >= req.task.throttle_max_wait
            ):
                waited = now - held.since
                self._reject(
                    held,
                    f"waited {waited:.1f}s for a slot of {held.key!r} "
                    f"(max_wait={req.task.throttle_max_wait})",
                )
            elif held.since < oldest:
                logger.info(
                    "celery-throttled: %s[%s] waited %.0fs for a slot of %r; handing it back "
                    "to the broker (throttle_max_hold)",
                    req.name,
                    req.id,
                    time.monotonic() - held.since,
                    held.key,
                )
                self._unwiden(held)
                self._give_back(held, requeue=True)

    # -- errgroups ----------------------------------------------------------------------------
    def _may_start(self, req: Any, held: Held | None) -> bool:
        """False (and the request dropped) for an errgroup member whose group was cancelled.

        Its "cancelled" envelope is written by whoever cancelled the group; written here too if
        it is not yet (the canceller may have died). The member records its own start when it
        begins to run (:func:`.cancellation.start_member`).
        """
        group = protocol.group(req)
        if group is None:
            return True
        try:
            cancelled, settled = self.groups.peek(group["id"], req.id)
        except redis.RedisError:
            return True  # its run checks again
        if not cancelled:
            return True
        if held is not None:
            self._unwiden(held)
            self.release(held)
        if not settled:
            write_cancelled(self.consumer.app, group, req.id, req.name, "before it started")
        worker_state.task_ready(req)
        req.acknowledge()
        return False

    def group_cancelled(self, gid: str) -> None:
        """An errgroup was cancelled: drop its waiting members here, and stop its running ones
        where the pool can (``terminate=True`` on prefork)."""
        if threading.get_ident() != self._loop_thread:
            self._on_loop(self.group_cancelled, gid)
            return
        with self._lock:
            waiting = [h for h in self._waiting.values() if _group_id(h.req) == gid]
        for held in waiting:
            self._may_start(held.req, held)
        if self.pool_kind != "prefork":
            return  # threads cannot be stopped: they see current_context().cancelled
        running = [
            req
            for req in list(worker_state.active_requests)
            if protocol.ADMITTED.get(req)
            and req.time_start
            and (group := protocol.group(req)) is not None
            and group["id"] == gid
            and group.get("terminate")
        ]
        try:  # the member that failed (and any that just ended) must keep its own envelope
            ended = self.groups.settled_among(gid, [req.id for req in running])
        except redis.RedisError:
            return
        for req in running:
            if req.id in ended:
                continue
            logger.info(
                "celery-throttled: stopping %s[%s]: its errgroup %s was cancelled",
                req.name,
                req.id,
                gid,
            )
            protocol.CANCELLED.set(
                req._context,
                f"task {req.name}[{req.id}] was stopped: its errgroup {gid} was cancelled",
            )
            req.terminate(self.consumer.pool, signal="SIGTERM")

    def _drop_cancelled_members(self, waiting: list[Held]) -> list[Held]:
        """The sweep's check for missed cancellation messages; returns the others."""
        gids = sorted({gid for held in waiting if (gid := _group_id(held.req)) is not None})
        if not gids:
            return waiting
        try:
            cancelled = self.groups.cancelled_among(gids)
        except redis.RedisError:
            return waiting
        keep = []
        for held in waiting:
            if _group_id(held.req) in cancelled:
                self._may_start(held.req, held)
            else:
                keep.append(held)
        return keep

    def _reject(self, held: Held, reason: str) -> None:
        """The wait policy refuses ``held`` a slot: it settles as ``rejected`` without running."""
        self._unwiden(held)
        self.release(held, "rejected")
        rejected(held.req, reason)

    def _give_back(self, held: Held, requeue: bool = False) -> None:
        self.release(held)
        worker_state.task_ready(held.req)
        if requeue:
            held.req.reject(requeue=True)

    def _unwiden(self, held: Held) -> None:
        if held.widened:
            held.widened = False
            self._widened -= 1
            self.consumer.qos.decrement_eventually()

    # -- lifecycle (the consumer bootstep) ----------------------------------------------------
    def start(self) -> None:
        self._closed = False
        self._loop_thread = threading.get_ident()
        self.transport.start()
        if self._sweeper is None:
            self._sweeper = self.consumer.timer.call_repeatedly(
                self.settings.sweep_interval,
                self.sweep,
                priority=5,
            )

    def stop(self) -> None:
        """The consumer stops (shutdown, or reconnecting): let go of every held message.

        On a warm shutdown the messages are handed back to the broker explicitly; when the
        connection was lost they are already void and the broker redelivers them.
        """
        shutting_down = bool(worker_state.should_stop or worker_state.should_terminate)
        with self._lock:
            waiting = list(self._waiting.values())
        for held in waiting:
            held.widened = False
            self._give_back(held, requeue=shutting_down)
        self._widened = 0
        if self._sweeper is not None:
            self.consumer.timer.cancel(self._sweeper)
            self._sweeper = None
        self.transport.suspend()

    def close(self) -> None:
        self._closed = True
        self.stop()

    # -- the transport side -----------------------------------------------------------------------
    def snapshot(self) -> list[Renew]:
        by_key: dict[str, tuple[list[str], list[str]]] = {}
        with self._lock:
            for key, holder in self._running:
                by_key.setdefault(key, ([], []))[0].append(holder)
            for key, holder in self._waiting:
                by_key.setdefault(key, ([], []))[1].append(holder)
            caps = dict(self._caps)
        return [Renew(key, caps.get(key, 1), run, wait) for key, (run, wait) in by_key.items()]

    def lost(self, key: str, holders: list[str]) -> None:
        """Leases that expired: their worker died (or stalled past the lease TTL).

        This worker removed them, so it alone reports them: each task not already settled gets
        a ``worker_lost`` envelope, so its caller never waits forever. Runs off the event loop.
        """
        with self._lock:
            mine = {h for (k, h) in self._running if k == key}
        orphans = [h for h in holders if h not in mine]
        if orphans:
            threading.Thread(
                target=report_lost,
                args=(self.consumer.app, key, orphans),
                name="throttle-lost",
                daemon=True,
            ).start()

    def _metric_counts(self) -> dict[str, tuple[int, int, int]]:
        """Per key: declared cap, running here, waiting here (for the metrics gauges)."""
        with self._lock:
            out = {key: [cap, 0, 0] for key, cap in self._caps.items()}
            for key, _ in self._running:
                out.setdefault(key, [0, 0, 0])[1] += 1
            for key, _ in self._waiting:
                out.setdefault(key, [0, 0, 0])[2] += 1
        # one series per errgroup would grow without bound: errgroups' own limits are left out
        return {
            key: (c, r, w)
            for key, (c, r, w) in out.items()
            if not key.startswith(ERRGROUP_KEY_PREFIX)
        }


def _group_id(req: Any) -> str | None:
    group = protocol.group(req)
    return None if group is None else str(group["id"])


def _expired(req: Any) -> bool:
    expires = req.expires
    if expires is None:
        return False
    now = datetime.now(timezone.utc if expires.tzinfo else None)
    return bool(now > expires)


def _holds_slot(entry: Any) -> bool:
    args: tuple[Any, ...] = entry[1] if len(entry) > 1 else ()
    return bool(args) and protocol.SLOT.get(args[0])


def _deadline_passed(req: Any) -> bool:
    deadline = protocol.deadline(req)
    return deadline is not None and time.time() >= deadline


def _pool_kind(pool: Any) -> str:
    module = type(pool).__module__.rsplit(".", 1)[-1]
    return {"thread": "threads"}.get(module, module)
