"""The gate: hold a throttled request until the cluster grants it a slot, then admit it.

The data path, all on the worker's main process::

    message -> strategy -> Gate.route -> (limit set?) -> Gate.submit: hold, unacknowledged
            -> Acquire (the transport: on the event loop, or two threads) -> granted now,
               or later by a release anywhere in the cluster
            -> Gate._admit on the event loop -> written to a pool process at once
            -> the pool process frees the slot as the body ends (:mod:`..pool.release`)
            -> on_success / on_failure / hard timeout / revoke / cancel -> Gate.release
               (idempotent: the safety net for a pool process lost before it could release)

A held request occupies no pool process or thread, is not re-published and costs no retry;
each one that waits widens the prefetch window (:mod:`.window`). :mod:`.sweep` sweeps them.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery.worker import state as worker_state

from .. import deadlines, tracing, transport
from .. import request as protocol
from ..errgroup.members import Members
from ..errgroup.store import GroupStore
from ..errors import KeyFunctionError
from ..keys import ERRGROUP_KEY_PREFIX
from ..metrics import Metrics
from ..settings import Settings
from ..task import ThrottledTask
from ..transport.leases import Acquire, Release, Renew
from . import outcomes, poolqueue
from .endpaths import hook_end_paths
from .lines import LINGER, Held, Lines, highest_first
from .loop import Loop
from .parking import Parking
from .pokes import Pokes
from .sweep import carry_out
from .window import Window

__all__ = ["Gate"]

logger = logging.getLogger(__name__)


class Gate:
    """The waiting lines of one worker consumer, and who is admitted from them."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.settings = settings = Settings.from_app(consumer.app)
        host = str(consumer.hostname).replace(" ", "_")
        self.worker = f"{host}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        client = settings.client(
            socket_timeout=5, socket_connect_timeout=2, health_check_interval=10
        )
        self.lines = Lines()
        self.window = Window(consumer, settings.max_held)
        self.pool_kind = poolqueue.kind(consumer.pool)
        groups = GroupStore(client, settings.key_prefix, settings.errgroup_ttl)
        self.members = Members(consumer.app, groups, consumer, self.pool_kind, self._drop)
        self.loop = Loop(consumer)
        self.pokes = Pokes(self.loop.call_later, self._poke)
        self.highest = highest_first(consumer)
        callbacks = transport.Callbacks(
            snapshot=self.lines.renewals,
            granted=self.loop.batched(self._grant),
            lost=self.lost,
            waiting=self.loop.on_loop(self.waiting),
            group_cancelled=self.loop.on_loop(self.group_cancelled),
            wake=self.loop.on_loop(self.pokes.wake),
        )
        self.transport = transport.build(
            settings, hub=consumer.hub, worker=self.worker, callbacks=callbacks
        )
        self._closed = False
        self.metrics: Metrics | None = None
        if settings.metrics_port is not None:
            self.metrics = Metrics(self.lines.counts, self.lines.rates, client, settings.key_prefix)
            self.metrics.serve(settings.metrics_port, settings.metrics_addr)
        self._dispatch: Callable[[Any], Any] = consumer.on_task_request
        consumer.on_task_request = self.route
        self.parking = Parking(
            self,
            admit=self._admit,
            started=self._started,
            ended=self._ended,
            judge=lambda held: carry_out(self, held, time.monotonic()),
        )

    # -- the event loop side -----------------------------------------------------------------
    def route(self, req: Any) -> Any:
        """Replaces ``consumer.on_task_request``: every request path (direct, ETA, rate limit)."""
        task = req.task
        if not isinstance(task, ThrottledTask) or protocol.ADMITTED.get(req):
            return self.dispatch(req)
        protocol.INFO.set(req, {"pool": self.pool_kind})
        if deadlines.passed(req):
            outcomes.deadline_passed(req, "while it was queued")
            return None
        limit = task.throttle_cap
        group = protocol.group(req)
        if group is not None and group.get("limit"):
            # an errgroup's own limit first, then the task's cap (always in that order)
            return self.submit(
                req, int(group["limit"]), key=ERRGROUP_KEY_PREFIX + group["id"], then=limit
            )
        if limit is None:
            if not self.members.may_start(req, None):
                return None
            return self._run(req)
        return self.submit(req, limit)

    def _run(self, req: Any) -> Any:
        deadlines.arm(req)
        protocol.ADMITTED.set(req, True)
        return self.dispatch(req)

    def dispatch(self, req: Any) -> Any:
        """To the pool; a parked waiter leaves its process if ``req`` found none idle."""
        result = self._dispatch(req)
        self.parking.make_room()
        return result

    def submit(
        self,
        req: Any,
        cap: int,
        *,
        key: str | None = None,
        then: int | None = None,
        outer: Held | None = None,
    ) -> None:
        """Wait for a slot of ``key`` (default: the task's key, under the task's admission
        rules), holding ``outer`` meanwhile."""
        try:
            held = Held.of(req, cap, key, self.worker, self.settings.pending_ttl, self.highest)
        except KeyFunctionError as exc:
            logger.error("%s", exc)
            if outer is not None:
                self.release(outer)
            outcomes.never_runs(req, exc)
            return
        held.outer, held.next_cap = outer, then
        held.wait = tracing.wait_started(req, held.key, cap)
        if self.lines.join(held):
            self.transport.register(held.key)
        park = self.parking.nonce(held)
        self.transport.submit(Acquire(held.key, held.holder, cap, held.admission, held.rank, park))

    def waiting(self, key: str, holder: str) -> None:
        """No slot for ``holder`` right now: it waits (or is rejected, with on_full='reject')."""
        held = self.lines.waiter(key, holder)
        if held is None:
            return
        held.queued = True
        if held.req.task.throttle_on_full == "reject":
            self.reject(held, f"no slot of {key!r} was free (on_full='reject')")
        else:
            self.window.widen(held)
            self.parking.fill()

    def _grant(self, key: str, holder: str, room: int | None) -> None:
        """A slot was granted to ``holder`` (``room``: the key's free slots after it, if known)."""
        held, running, cap = self.lines.granted(key, holder)
        if held is not None:
            held.deferred = held.far_from_binding(room)
            if not self.parking.granted(held):
                self._admit(held)
        elif not running:
            # Granted to a request this worker no longer holds (revoked, handed back,
            # or dropped on reconnect): give the slot straight back.
            self.transport.submit(Release(key, holder, cap))

    def _admit(self, held: Held) -> None:
        self.window.narrow(held)
        req = held.req
        if self._closed:
            self.give_back(held)
            return
        if req.revoked():
            self.release(held)
            return
        if deadlines.passed(req):
            self.release(held)
            outcomes.deadline_passed(req, f"while it waited for a slot of {held.key!r}")
            return
        if held.next_cap is not None:  # the errgroup's slot is ours: now the task's own cap
            self.lines.run(held)
            self.submit(req, held.next_cap, outer=held)
            return
        if not self.members.may_start(req, held):
            return
        self._started(held)
        info = protocol.info(req)
        info.update(waited=held.waited, leases=held.leases(), admitted_at=time.time())
        if held.deferred:
            info["deferred"] = True  # the pool process leaves the release to this process
        hook_end_paths(req, lambda outcome, later: self._ended(held, outcome, later))
        self._run(req)
        poolqueue.jump(self.consumer, req)
        if held.queued:  # a hand-off: to a pool process now, not on the loop's next turn
            poolqueue.write_now(self.consumer)

    def _started(self, held: Held) -> None:
        """``held`` holds its slot and runs (or is about to): counted once, when first told."""
        self.window.narrow(held)
        if held.admitted_at is None:
            held.admitted_at = time.monotonic()
            held.waited = held.admitted_at - held.since
            if self.metrics is not None:
                self.metrics.admitted(held.key, held.waited)
        self.lines.run(held)
        protocol.SLOT.set(held.req, True)

    def _ended(self, held: Held, outcome: str, later: bool) -> None:
        """A run ended: its slot goes back; the pool process it leaves may take a waiter."""
        self.release(held, outcome, later=later)
        self.parking.fill()

    def release(self, held: Held, outcome: str = "", wait: str = "", later: bool = False) -> None:
        """Give the slot (or the place in line) back, and the errgroup's slot held with it.

        Idempotent; called from any thread. ``outcome`` ("done", "failed", "retried") is counted
        per key for ``celery throttle``; ``wait`` says why a wait ended unadmitted (tracing);
        ``later``: the pool process freed the slot already; this safety net rides along later.
        """
        if not self.lines.leave(held):
            return
        tracing.wait_released(held.wait, wait or outcome, held.req)
        op = Release(held.key, held.holder, held.cap, outcome, held.waited, held.admission)
        self.transport.submit(op, later=later, within=LINGER if held.deferred else None)
        if held.outer is not None:
            self.release(held.outer, outcome, later=later)
        if self.metrics is not None:
            ran = None if held.admitted_at is None else time.monotonic() - held.admitted_at
            self.metrics.ended(held.key, outcome, ran)

    def group_cancelled(self, gid: str) -> None:
        """An errgroup was cancelled somewhere in the cluster."""
        self.members.cancelled(gid, self.lines.waiting())

    def _drop(self, held: Held) -> None:
        self.window.narrow(held)
        self.release(held, wait="cancelled")

    def reject(self, held: Held, reason: str) -> None:
        """The wait policy refuses ``held`` a slot: it settles as ``rejected`` without running."""
        self.window.narrow(held)
        self.release(held, "rejected")
        outcomes.rejected(held.req, reason)

    def give_back(self, held: Held, requeue: bool = False) -> None:
        self.release(held, wait="handed_back")
        worker_state.task_ready(held.req)
        if requeue:
            held.req.reject(requeue=True)

    # -- lifecycle (the consumer bootstep, :mod:`.strategy`) ------------------------------------
    def start(self) -> None:
        self._closed = False
        self.loop.enter()
        self.transport.start()

    def stop(self) -> None:
        """The consumer stops (shutdown, or reconnecting): let go of every held message.

        On a warm shutdown the messages are handed back to the broker explicitly; when the
        connection was lost they are already void and the broker redelivers them.
        """
        shutting_down = bool(worker_state.should_stop or worker_state.should_terminate)
        waiting = [h for h in self.lines.waiting() if not self.parking.unpark(h)]
        self.window.forget(waiting)
        for held in waiting:
            self.give_back(held, requeue=shutting_down)
        self.pokes.cancel_all()
        self.transport.suspend()

    def close(self) -> None:
        self._closed = True
        self.stop()

    # -- the transport side -----------------------------------------------------------------------
    def _poke(self, key: str) -> None:
        """A key's next token is due: run its grant (:mod:`.pokes`)."""
        cap, admission = self.lines.rules(key)
        self.transport.submit(Renew(key, cap, admission=admission))

    def lost(self, key: str, holders: list[str]) -> None:
        """Leases that expired (their worker died, or stalled past the lease TTL), removed by
        this worker, which alone reports them: a ``worker_lost`` envelope for each unsettled."""
        running = self.lines.running_holders(key)
        outcomes.report_lost_soon(self.consumer.app, key, holders, running)
