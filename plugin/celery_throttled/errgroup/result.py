"""The handle of a sent errgroup: wait for its members, read their envelopes, cancel it."""

from __future__ import annotations

import json
from typing import Any

from celery import current_app
from celery.canvas import Signature
from celery.exceptions import TimeoutError as CeleryTimeoutError

from ..envelope import Envelope
from ..results import EnvelopeResult, envelope_from_meta
from .flow import cancel_group
from .store import store_for

__all__ = ["EagerErrgroupResult", "ErrgroupResult"]


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
