"""What one pass of a transport sends: a renewal round, registrations, operations
(:mod:`.base` decides what goes in it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .leases import Op, Renew

__all__ = ["Batch", "Command", "Round", "registering"]

Command = tuple[Any, ...]

#: how far back the key registry is read for reaping, and how many keys at most per round
REGISTRY_WINDOW = 3600.0
REGISTRY_BATCH = 200
#: keys unused for this long leave the registry (per-value keys and errgroups' own limits
#: would otherwise pile up there)
REGISTRY_RETENTION = 7 * 86400.0


def registering(registry: str, keys: set[str], now: float) -> Command:
    """``keys`` put in the key registry (or kept there) as used at ``now`` (epoch seconds)."""
    return ("ZADD", registry, *[part for key in sorted(keys) for part in (now, key)])


@dataclass
class Round:
    """One renewal round: this worker's renewals and the registry's upkeep, sent together;
    the last command reads the registry, and :meth:`reaping` turns its reply into the passes
    to send next."""

    renewals: list[Renew]
    commands: list[Command]

    @classmethod
    def of(cls, renewals: list[Renew], registry: str, now: float) -> Round:
        """``renewals``, with the registry's upkeep: their keys marked used, keys unused for
        :data:`REGISTRY_RETENTION` dropped, and the keys used in the last
        :data:`REGISTRY_WINDOW` read (at most :data:`REGISTRY_BATCH`), to reap."""
        commands: list[Command] = []
        if renewals:
            commands.append(registering(registry, {op.key for op in renewals}, now))
        commands.append(("ZREMRANGEBYSCORE", registry, "-inf", now - REGISTRY_RETENTION))
        since = now - REGISTRY_WINDOW
        commands.append(("ZREVRANGEBYSCORE", registry, "+inf", since, "LIMIT", 0, REGISTRY_BATCH))
        return cls(renewals, commands)

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
