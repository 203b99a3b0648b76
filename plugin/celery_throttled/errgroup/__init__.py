"""Errgroups: a fail-fast group of throttled tasks (:mod:`.api`), its state in Redis
(:mod:`.store`), and how a failure travels through it (:mod:`.flow`).

The errgroup plugs into the pool in this one place: before each run its guard records a
member's start (or stops a member whose group was cancelled), and after each envelope is
written its listener counts the member and cancels the group on the first failure.
"""

from __future__ import annotations

from ..pool import backend, execution
from . import flow
from .api import Errgroup, errgroup
from .result import EagerErrgroupResult, ErrgroupResult

__all__ = ["EagerErrgroupResult", "Errgroup", "ErrgroupResult", "errgroup"]

if flow.guard not in execution.guards:
    execution.guards.append(flow.guard)
if flow.settled not in backend.settled_listeners:
    backend.settled_listeners.append(flow.settled)
