"""``errgroup``: a fail-fast group of throttled tasks, like Go's ``errgroup.WithContext``.

::

    res = errgroup([fetch.s(u) for u in urls], limit=3).apply_async()
    envelopes = res.get(timeout=60)   # list[Envelope] in member order
    values = res.unwrap()             # the values, or TaskError of the first error

The first member whose envelope is not ok cancels the group: members that have not started
never start and settle as "cancelled"; running ones see ``current_context().cancelled`` (and
with ``terminate=True`` on prefork they are stopped). The body (``errgroup(...) | body``) runs
once, only when every member succeeded; the errback (``.on_error(sig)``) runs once, with the
first envelope that is not ok. State lives in Redis (:mod:`.store`); failures travel
through :mod:`.flow`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from celery import current_app
from celery.canvas import Signature
from celery.exceptions import NotRegistered

from .. import request as protocol
from ..context import current_context
from ..envelope import Envelope
from ..errors import ConfigurationError
from ..task import ThrottledTask
from .flow import cancel_group, never_ran
from .result import EagerErrgroupResult, ErrgroupResult
from .store import store_for

__all__ = ["Errgroup", "errgroup"]


def errgroup(
    tasks: Iterable[Signature], *, limit: int | None = None, terminate: bool = False
) -> Errgroup:
    """A fail-fast group of throttled task signatures.

    ``limit``: at most this many members run at once across the cluster (each member's own
    cap applies as well). ``terminate``: on the first error also stop running members where
    the pool can (prefork); elsewhere they are told through ``current_context().cancelled``.
    """
    members = list(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigurationError(f"errgroup: limit must be a positive int or None, got {limit!r}")
    if not isinstance(terminate, bool):
        raise ConfigurationError(f"errgroup: terminate must be a bool, got {terminate!r}")
    for index, sig in enumerate(members):
        _check_member(index, sig)
    return Errgroup(members, limit=limit, terminate=terminate)


class Errgroup:
    """An errgroup not sent yet; ``apply_async()`` sends it."""

    def __init__(
        self,
        members: list[Signature],
        *,
        limit: int | None,
        terminate: bool,
        body: Signature | None = None,
        errback: Signature | None = None,
    ) -> None:
        self.members = members
        self.limit = limit
        self.terminate = terminate
        self.body = body
        self.errback = errback

    def __or__(self, body: Signature) -> Errgroup:
        """``errgroup(...) | body``: the body gets the list of values once all succeeded."""
        return self._with(body=_check_callback("body", body))

    def on_error(self, errback: Signature) -> Errgroup:
        """The errback gets the first envelope that is not ok (as JSON), exactly once."""
        return self._with(errback=_check_callback("errback", errback))

    def _with(self, **changes: Any) -> Errgroup:
        options: dict[str, Any] = {
            "limit": self.limit,
            "terminate": self.terminate,
            "body": self.body,
            "errback": self.errback,
        }
        options.update(changes)
        return Errgroup(self.members, **options)

    def delay(self) -> ErrgroupResult:
        return self.apply_async()

    def apply_async(self, *, deadline: Any = None, **options: Any) -> ErrgroupResult:
        """Register the group in Redis, then send every member (``options`` apply to each:
        ``queue``, ``countdown``…; ``deadline`` as for a throttled task).

        Inside a running throttled task the group is that task's child: it inherits the
        task's deadline, and is cancelled when the task fails or its own errgroup is
        cancelled.
        """
        app = self.members[0]._app if self.members and self.members[0]._app else current_app
        if app.conf.task_always_eager:
            return self._apply_eagerly(app, options)
        gid = str(uuid.uuid4())
        ids = [str(uuid.uuid4()) for _ in self.members]
        body = None
        if self.body is not None:
            body = self.body.clone()
            body.set(task_id=str(uuid.uuid4()))
        ctx = current_context()
        store = store_for(app)
        store.register(
            gid,
            [(task_id, sig.task) for task_id, sig in zip(ids, self.members, strict=True)],
            limit=self.limit,
            terminate=self.terminate,
            body=None if body is None else dict(body),
            errback=None if self.errback is None else dict(self.errback),
            parent_task=ctx.task_id,
        )
        result = ErrgroupResult(gid, ids, app=app, body=body)
        if not self.members:
            store.finish_empty(gid)
            if body is not None:
                body.apply_async(([],))
            return result
        if ctx.cancelled:
            cancel_group(app, gid, f"task {ctx.task_id}, which started it, was cancelled")
            return result
        header = {"id": gid, "limit": self.limit, "terminate": self.terminate}
        sent = 0
        try:
            with app.producer_or_acquire(options.pop("producer", None)) as producer:
                for task_id, sig in zip(ids, self.members, strict=True):
                    headers = {**(sig.options.get("headers") or {}), **options.get("headers", {})}
                    headers = protocol.GROUP.into(headers, header)
                    member_options = {**options, "headers": headers}
                    if deadline is not None:
                        member_options["deadline"] = deadline
                    sig.apply_async(task_id=task_id, producer=producer, **member_options)
                    sent += 1
        except Exception as exc:
            cancel_group(app, gid, f"sending member {sent} failed ({type(exc).__name__}: {exc})")
            raise
        return result

    def _apply_eagerly(self, app: Any, options: dict[str, Any]) -> ErrgroupResult:
        """``task_always_eager``: run the members inline, in order; after the first failure the
        rest settle as "cancelled" without running (no Redis involved)."""
        gid = str(uuid.uuid4())
        envelopes: list[Envelope] = []
        first: Envelope | None = None
        for sig in self.members:
            task_id = str(uuid.uuid4())
            if first is None:
                envelope = sig.apply(task_id=task_id, **options).get()
                first = None if envelope.ok else envelope
            else:
                reason = f"member {first.task_id} did not succeed"
                error = never_ran(sig.task, task_id, gid, reason)
                envelope = Envelope(ok=False, error=error, task_id=task_id, task_name=sig.task)
            envelopes.append(envelope)
        body = None
        if first is None and self.body is not None:
            body = self.body.apply(([e.value for e in envelopes],))
        if first is not None and self.errback is not None:
            self.errback.apply((first.to_json(),))
        return EagerErrgroupResult(gid, envelopes, app=app, body=body)


def _check_member(index: int, sig: Any) -> None:
    if not isinstance(sig, Signature) or sig.subtask_type is not None:
        raise ConfigurationError(
            f"errgroup member {index}: expected the signature of a throttled task "
            f"(task.s(...)), got {sig!r}"
        )
    app = sig._app or current_app
    try:
        task = app.tasks[sig.task]
    except NotRegistered:
        raise ConfigurationError(
            f"errgroup member {index}: task {sig.task!r} is not registered in this process; "
            "import its module first"
        ) from None
    if not isinstance(task, ThrottledTask):
        raise ConfigurationError(
            f"errgroup member {index}: task {sig.task!r} is not a throttled task; only "
            "@throttled_task signatures can join an errgroup (they carry its cancellation and "
            "their envelopes)"
        )
    if task.ignore_result or sig.options.get("ignore_result"):
        raise ConfigurationError(
            f"errgroup member {index}: task {sig.task!r} ignores its result "
            "(ignore_result=True); an errgroup needs every member's envelope"
        )


def _check_callback(what: str, sig: Any) -> Signature:
    if not isinstance(sig, Signature):
        raise ConfigurationError(f"errgroup: the {what} must be a task signature, got {sig!r}")
    return sig
