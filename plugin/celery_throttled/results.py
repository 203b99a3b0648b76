"""Envelopes read back: ``AsyncResult.get()`` of a throttled task returns an :class:`Envelope`.

What is stored (see :mod:`.pool.backend`, the writing side) reads without a decoding error
for a client without this package too; :func:`envelope_from_meta` turns it back into an
envelope, whether the envelope's details are there or not.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from celery import states
from celery.result import AsyncResult, EagerResult

from . import request as protocol
from .envelope import Envelope, ErrorInfo, error_for

__all__ = ["EagerEnvelopeResult", "EnvelopeResult", "envelope_from_meta"]


def envelope_from_meta(meta: dict[str, Any], task_id: str, task_name: str | None) -> Envelope:
    details = meta.get("envelope")
    status = meta.get("status")
    result = meta.get("result")
    base = Envelope.from_json(details) if isinstance(details, dict) else None
    name = (base.task_name if base else None) or task_name
    common: dict[str, Any] = {"task_id": task_id, "task_name": name}
    if status == states.SUCCESS:
        if base is None:
            return Envelope(ok=True, value=result, **common)
        return replace(base, ok=True, value=result, **common)
    if base is not None and base.error is not None:
        return replace(base, ok=False, value=None, **common)
    exc = result if isinstance(result, BaseException) else Exception(str(result))
    kind = "revoked" if status == states.REVOKED else "error"
    error = error_for(exc) if kind == "error" else ErrorInfo.from_exception(exc, kind)
    if base is not None:
        return replace(base, ok=False, value=None, error=error, **common)
    return Envelope(ok=False, error=error, **common)


class EnvelopeResult(AsyncResult):  # type: ignore[misc]
    """``get()`` returns an :class:`Envelope` and never raises because the task failed.

    Only Celery's own ``TimeoutError`` escapes, when the caller's wait runs out.
    """

    def get(self, timeout: float | None = None, propagate: bool = True, **kwargs: Any) -> Any:
        super().get(timeout=timeout, propagate=False, **kwargs)
        return self.envelope()

    def envelope(self) -> Envelope:
        meta = self._cache if self._cache else self._get_task_meta()
        return envelope_from_meta(meta, self.id, getattr(self, "name", None))


class EagerEnvelopeResult(EagerResult):  # type: ignore[misc]
    """The eager-mode counterpart: the task ran inline; ``get()`` returns its envelope."""

    def get(self, timeout: float | None = None, propagate: bool = True, **kwargs: Any) -> Any:
        return self.envelope()

    def envelope(self) -> Envelope:
        meta = {"status": self.state, "result": self.result}
        details = protocol.ENVELOPE.get(self)
        if details:
            meta["envelope"] = details
        return envelope_from_meta(meta, self.id, self.name)
