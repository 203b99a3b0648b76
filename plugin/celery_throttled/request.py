"""The request's own protocol: every message header and attribute the package adds to Celery's
objects, named once, with typed accessors.

A header travels in the message and Celery copies it onto the task's request context; in the
worker's main process it is read from the request's message dict. :class:`Field` reads either::

    throttle            {"pool", "key", "waited", "admitted_at", "trace_id", "leases",
                        "deferred"}: set by the gate as it admits the request (a parked
                        one's ``waited`` and ``admitted_at``, epoch seconds, where its grant
                        arrives: the pool process), ``trace_id`` by :mod:`.tracing` when it
                        waits;
                        read where the task runs (the envelope's details; ``leases``, a list
                        of [key, holder, spec], the slots its pool process frees as it ends,
                        unless ``deferred``: the worker frees them, its cap far from binding)
    throttle_deadline   the caller's deadline, epoch seconds (JSON number)
    throttle_group      {"id", "limit", "terminate"}: the request is an errgroup member

Attributes (:class:`Attribute`) live on one process's objects only and never travel::

    on the worker's Request (main process)
      _throttle_admitted    it passed the gate (its next dispatch goes straight to the pool)
      _throttle_slot        it holds a cluster-wide slot (goes ahead in the pool's queue)
    on the task's request context (wherever its envelope is written)
      throttle_envelope     the envelope's details, filled in as the run goes
      throttle_settled      its envelope is written (a second report of the same end is dropped)
      throttle_cancelled    why its errgroup stopped it (terminate=True), if it did
    on the worker's consumer
      _throttle_gate        the consumer's gate
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from celery.app.task import Context

__all__ = [
    "ADMITTED",
    "CANCELLED",
    "DEADLINE",
    "ENVELOPE",
    "GATE",
    "GROUP",
    "INFO",
    "SETTLED",
    "SLOT",
    "Attribute",
    "Field",
    "context",
    "deadline",
    "group",
    "info",
]

T = TypeVar("T")


class Field:
    """A message header: an attribute of the task's context, an entry of the Request's dict."""

    def __init__(self, name: str) -> None:
        self.name = name

    def get(self, request: Any) -> Any:
        value = getattr(request, self.name, None)
        if value is None:
            message = getattr(request, "_request_dict", None)
            if isinstance(message, dict):
                value = message.get(self.name)
        return value

    def set(self, request: Any, value: Any) -> None:
        """On the worker's Request, before the task is sent to the pool."""
        request._request_dict[self.name] = value

    def into(self, headers: dict[str, Any] | None, value: Any) -> dict[str, Any]:
        """A copy of ``headers`` (message headers being sent) carrying ``value``."""
        return {**(headers or {}), self.name: value}


class Attribute(Generic[T]):
    """An attribute set on one of Celery's objects in this process; ``default`` when unset."""

    def __init__(self, name: str, default: T) -> None:
        self.name = name
        self.default = default

    def get(self, obj: Any) -> T:
        value: T = getattr(obj, self.name, self.default)
        return value

    def set(self, obj: Any, value: T) -> None:
        setattr(obj, self.name, value)


INFO = Field("throttle")
DEADLINE = Field("throttle_deadline")
GROUP = Field("throttle_group")

ADMITTED: Attribute[bool] = Attribute("_throttle_admitted", False)
SLOT: Attribute[bool] = Attribute("_throttle_slot", False)
ENVELOPE: Attribute[dict[str, Any] | None] = Attribute("throttle_envelope", None)
SETTLED: Attribute[bool] = Attribute("throttle_settled", False)
CANCELLED: Attribute[str | None] = Attribute("throttle_cancelled", None)
GATE: Attribute[Any] = Attribute("_throttle_gate", None)


def info(request: Any) -> dict[str, Any]:
    """The ``throttle`` header: what the gate recorded (empty when it never saw the request)."""
    value = INFO.get(request)
    return value if isinstance(value, dict) else {}


def deadline(request: Any) -> float | None:
    value = DEADLINE.get(request)
    return None if value is None else float(value)


def group(request: Any) -> dict[str, Any] | None:
    """The errgroup header of a request (or task context), if it is a member."""
    value = GROUP.get(request)
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return value
    return None


def context(
    task_id: str,
    *,
    task: str | None = None,
    hostname: str | None = None,
    throttle: dict[str, Any] | None = None,
    group: dict[str, Any] | None = None,
) -> Any:
    """A task context for an envelope written outside the task's own run."""
    fields: dict[str, Any] = {"id": task_id}
    if task is not None:
        fields["task"] = task
    if hostname is not None:
        fields["hostname"] = hostname
    if throttle is not None:
        fields[INFO.name] = throttle
    if group is not None:
        fields[GROUP.name] = group
    return Context(**fields)
