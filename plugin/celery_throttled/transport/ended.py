"""The worker's own releases of runs that ended, kept for the next renewal round.

The process that ran a body frees its slot itself (:mod:`..pool.release`); the worker's main
process still releases every holder afterwards, as the safety net for a pool process lost
before it could, or whose release failed. That release is submitted ``later`` and costs no
script call of its own: it rides in the next acquire of its key that goes out
(``Acquire.ended``), or else in its key's renewal of the next round (``Renew.ended``), one call
per key for all of them; the script (``acquire.lua``, ``renew.lua``) only confirms a holder its
pool process freed, and releases any other as ``release.lua`` would, before anything else.
Everything else that ends a run (a lost pool process, a hard time limit, a revocation) is
released at once, never through here.

So a holder's release is never sent after an acquire of the same holder (a retry reusing its
name), which it would free. A key's releases go in a renewal of their own once :data:`LATER`
have gathered.

A release may also come with a date it must not wait past (``by``): one whose pool process
left the slot to the worker (the cap was far from binding as it was granted, see
:meth:`..worker.lines.Held.far_from_binding`), which still holds its slot until it goes. The
first such date since the releases were last taken makes :attr:`Ended.due_at`; at that date
every release kept goes, in renewals of their own, unless acquires carried them first. Not
thread-safe: :mod:`.base` holds its lock around every call.
"""

from __future__ import annotations

from dataclasses import replace

from .leases import Acquire, Op, Release, Renew

__all__ = ["LATER", "Ended", "again", "carried", "confirming", "hold_back"]

#: releases of one key submitted ``later`` that go at once, in a renewal of their own
LATER = 256


class Ended:
    """The releases submitted ``later``, per key, in the order they came."""

    def __init__(self) -> None:
        self._by_key: dict[str, list[Release]] = {}
        #: the ``time.monotonic()`` by which the releases kept must go (inf: the round's)
        self.due_at = float("inf")

    def add(self, op: Release, by: float | None = None) -> Renew | None:
        """Keep ``op`` for the round (or until ``by``, a ``time.monotonic()``); a renewal to send
        now when its key has :data:`LATER`."""
        if by is not None:
            self.due_at = min(self.due_at, by)
        releases = self._by_key.setdefault(op.key, [])
        releases.append(op)
        if len(releases) < LATER:
            return None
        return confirming(self._by_key.pop(op.key))

    def carry(self, acquire: Acquire) -> Acquire:
        """``acquire`` carrying every release of its key kept here (none is kept any longer)."""
        releases = self._by_key.pop(acquire.key, None)
        if not releases:
            return acquire
        return _carrying(acquire, releases)

    def take(self) -> dict[str, list[Release]]:
        """Every release kept, by key; none is kept any longer."""
        taken, self._by_key = self._by_key, {}
        self.due_at = float("inf")
        return taken

    def renewals(self) -> list[Renew]:
        """Every release kept, as renewals of their own (the process stops)."""
        return [confirming(releases) for releases in self.take().values()]


def _carrying(acquire: Acquire, releases: list[Release]) -> Acquire:
    """A copy of ``acquire`` (every field) that carries ``releases`` too. Its fields are copied
    as they are, not through ``dataclasses.replace``, which runs ``__init__`` again: a sixth of
    what an acquire costs the worker's loop, on every task of a busy key."""
    op: Acquire = object.__new__(Acquire)
    fields = op.__dict__
    fields.update(acquire.__dict__)
    fields["ended"] = (*acquire.ended, *releases)
    return op


def carried(renewals: list[Renew], ended: dict[str, list[Release]]) -> list[Renew]:
    """The round's ``renewals`` with the releases ``ended`` of their keys, and a renewal of its
    own for each other key. A holder found running too (it left the worker's lines after the
    releases were taken, before the snapshot) cannot be: it is dropped from the running."""
    out = []
    for op in renewals:
        releases = ended.pop(op.key, None)
        if releases:
            gone = {release.holder for release in releases}
            running = [holder for holder in op.running if holder not in gone]
            op = replace(op, running=running, ended=tuple(releases))
        out.append(op)
    return out + [confirming(releases) for releases in ended.values()]


def hold_back(ops: list[Op]) -> tuple[list[Acquire], list[Op]]:
    """During a grace: the acquires of ``ops`` to keep queued, and the rest, to send now. A
    release cancels the held acquire of its holder; the releases that acquire carried go now, in
    a renewal of their own."""
    released = {(op.key, op.holder) for op in ops if isinstance(op, Release)}
    acquires = [op for op in ops if isinstance(op, Acquire)]
    held = [op for op in acquires if (op.key, op.holder) not in released]
    now: list[Op] = [op for op in ops if not isinstance(op, Acquire)]
    cancelled = [op for op in acquires if (op.key, op.holder) in released and op.ended]
    return held, now + [confirming(list(op.ended)) for op in cancelled]


def confirming(releases: list[Release]) -> Renew:
    """A renewal carrying nothing but ``releases``, all of one key."""
    last = releases[-1]
    return Renew(last.key, last.cap, admission=last.admission, ended=tuple(releases))


def again(op: Op) -> Op | None:
    """What of ``op`` may be sent again late: a renewal is a snapshot of its moment (sent late,
    it would put back leases released since), but the releases it carries hold at any time."""
    if not isinstance(op, Renew):
        return op
    return replace(op, running=(), waiting=()) if op.ended else None
