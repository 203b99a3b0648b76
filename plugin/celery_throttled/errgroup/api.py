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

import json
import uuid
from collections.abc import Iterable
from typing import Any

from celery import current_app
from celery.canvas import Signature
from celery.exceptions import NotRegistered
from celery.exceptions import TimeoutError as CeleryTimeoutError

from .. import request as protocol
from ..context import current_context
from ..envelope import Envelope
from ..errors import ConfigurationError
from ..results import EnvelopeResult, envelope_from_meta
from ..task import ThrottledTask
from .flow import cancel_group, never_ran
from .store import store_for

__all__ = ["EagerErrgroupResult", "Errgroup", "ErrgroupResult", "errgroup"]


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


class ErrgroupResult:
    """The handle of a sent errgroup. ``ErrgroupResult.from_id(id)`` rebuilds it anywhere."""

    def __init__(
        self, gid: str, member_ids: list[str], *, app: Any = None, body: Signature | None = None
    ) -> None:
        self.id = gid
        self.member_ids = member_ids
        self.app = app or current_app
        body_id = None if body is None else body.options.get("task_id")
        self.body = None if body_id is None else self.app.AsyncResult(body_id)

    @classmethod
    def from_id(cls, gid: str, app: Any = None) -> ErrgroupResult:
        app = app or current_app
        store = store_for(app)
        state = store.state(gid)
        if not state:
            raise KeyError(f"errgroup {gid} is unknown (never sent, or its state expired)")
        result = cls(gid, store.members(gid), app=app)
        body = state.get("body")
        if body:
            body_id = json.loads(body).get("options", {}).get("task_id")
            result.body = None if body_id is None else app.AsyncResult(body_id)
        return result

    def __repr__(self) -> str:
        return f"<ErrgroupResult {self.id} ({len(self.member_ids)} members)>"

    @property
    def results(self) -> list[EnvelopeResult]:
        return [EnvelopeResult(task_id, app=self.app) for task_id in self.member_ids]

    def ready(self) -> bool:
        """True once every member has settled."""
        return store_for(self.app).done(self.id)

    def completed_count(self) -> int:
        """Members settled so far (ok or not)."""
        return store_for(self.app).settled_count(self.id)

    @property
    def cancelled(self) -> bool:
        return store_for(self.app).cancelled(self.id)

    @property
    def first_error(self) -> Envelope | None:
        """The envelope of the first member to fail, in time; None while none has."""
        task_id = store_for(self.app).first_error(self.id)
        return None if task_id is None else self._envelope(task_id)

    def get(self, timeout: float | None = None) -> list[Envelope]:
        """Wait until every member has settled; their envelopes, in member order.

        Never raises because a member failed; raises Celery's ``TimeoutError`` when
        ``timeout`` seconds pass first.
        """
        if not store_for(self.app).wait(self.id, timeout):
            raise CeleryTimeoutError(
                f"errgroup {self.id}: {self.completed_count()} of {len(self.member_ids)} "
                f"members settled within {timeout}s"
            )
        return [self._envelope(task_id) for task_id in self.member_ids]

    def unwrap(self, timeout: float | None = None) -> list[Any]:
        """The values in member order, or raise :class:`TaskError` of the first error."""
        envelopes = self.get(timeout)
        first = self.first_error
        if first is not None:
            first.unwrap()
        return [envelope.unwrap() for envelope in envelopes]

    def cancel(self, reason: str = "cancelled by the caller") -> bool:
        """Cancel the whole group; False when it was already cancelled (or is unknown)."""
        return cancel_group(self.app, self.id, reason)

    def _envelope(self, task_id: str) -> Envelope:
        meta = self.app.backend.get_task_meta(task_id)
        return envelope_from_meta(meta, task_id, None)


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


class EagerErrgroupResult(ErrgroupResult):
    """The result of an errgroup run inline (``task_always_eager``): already settled."""

    def __init__(
        self, gid: str, envelopes: list[Envelope], *, app: Any = None, body: Any = None
    ) -> None:
        super().__init__(gid, [e.task_id or "" for e in envelopes], app=app)
        self.envelopes = envelopes
        self.body = body

    def ready(self) -> bool:
        return True

    def completed_count(self) -> int:
        return len(self.envelopes)

    @property
    def cancelled(self) -> bool:
        return self.first_error is not None

    @property
    def first_error(self) -> Envelope | None:
        return next((e for e in self.envelopes if not e.ok), None)

    def get(self, timeout: float | None = None) -> list[Envelope]:
        return list(self.envelopes)

    def cancel(self, reason: str = "cancelled by the caller") -> bool:
        return False
