"""What one pass of a transport sends: a renewal round, registrations, operations
(:mod:`.base` decides what goes in it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .leases import Op, Renew

__all__ = ["Batch", "Command", "Round"]

Command = tuple[Any, ...]


@dataclass
class Round:
    """One renewal round: this worker's renewals and the registry's upkeep, sent together;
    the last command reads the registry, and :meth:`reaping` turns its reply into the passes
    to send next."""

    renewals: list[Renew]
    commands: list[Command]

    def reaping(self, members: Any) -> list[Renew]:
        if not isinstance(members, list):
            return []
        known = {op.key for op in self.renewals}
        keys = (m.decode() if isinstance(m, bytes) else str(m) for m in members)
        return [Renew(key, 0) for key in keys if key not in known]


@dataclass
class Batch:
    """What to send now, in this order: a round, registrations, operations."""

    round: Round | None = None
    commands: list[Command] = field(default_factory=list)
    registered: set[str] = field(default_factory=set)
    ops: list[Op] = field(default_factory=list)
    #: the server (see :meth:`Transport._stale`) it was made for
    server: int = 0

    def operations(self) -> list[Op]:
        """Its script calls known before it is sent: the round's renewals, then the ops."""
        return [*(self.round.renewals if self.round else ()), *self.ops]
