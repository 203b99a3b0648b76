"""Slot leases in Redis: acquire, release, renew, each one atomic Lua script.

A *lease* is a slot of a throttle key held by one holder (a worker and a task id) until an
expiry that the holder's worker keeps pushing forward. Why a lease and not a counter::

    t0  worker A takes a slot for task 1            holders = {A/1 until t0+30s}
    t1  worker A is SIGKILLed; nobody releases
    t2  the lease passes its expiry                 the next acquire or release reaps it
    t3  a waiter anywhere in the cluster gets it

A counter would have leaked the slot at t1 forever. Waiting holders queue in Redis too, in
ticket order, so the oldest waiter in the cluster is served first and no worker starves.
A grant to a waiter of the calling worker comes back in the script's reply; a grant to a
waiter elsewhere is published on that worker's channel.

The scripts live in ``lua/`` with a KEYS/ARGV/returns header each; ``admission.lua`` (rates,
families, priorities, pending sets), ``grant.lua`` and ``free.lua`` are shared. A key's admission
rules travel in each operation (:class:`~..admission.Admission`) and reach the scripts in their
cap argument. This module turns operations into script calls and replies into
:class:`Outcome`; the transports (a redis-py pipeline here, the event loop's own connection in
:mod:`.eventloop`) only move bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import redis
from redis.cluster import RedisCluster

from ..admission import Admission, spec
from ..keys import Family, grant_channel_prefix, split_key
from .scripts import Script, Scripts

__all__ = [
    "Acquire",
    "Outcome",
    "RedisLeases",
    "Release",
    "Renew",
    "ServerChanged",
    "lease_spec",
]


class ServerChanged(redis.ConnectionError):
    """A new connection found another Redis server than before (restarted, or failed over):
    what was about to be sent on it is not, so that it can wait for the grace (see
    :mod:`.base`)."""


@dataclass(frozen=True)
class Acquire:
    key: str
    holder: str
    cap: int
    admission: Admission | None = None
    #: its place among priorities (lower goes first; :func:`~..admission.rank`)
    rank: int = 0
    #: a park nonce: if the holder waits, it is marked parked with it, so that its worker may
    #: park it in an idle pool process with no more commands (:mod:`...worker.parking`)
    park: str = ""
    #: the worker's own releases of holders of ``key`` whose runs ended, carried along
    #: (:mod:`.ended`), handled before the acquire itself
    ended: Sequence[Release] = ()


@dataclass(frozen=True)
class Release:
    key: str
    holder: str
    cap: int
    #: how the run ended ("done", "failed"), counted per key; "" when it never ran
    outcome: str = ""
    #: seconds it waited for its slot, kept for the wait-time percentiles; None: not recorded
    waited: float | None = None
    admission: Admission | None = None
    #: the cap argument already built (:func:`lease_spec`): the pool process has no Admission
    spec: str = ""
    #: sent by the pool process as the body ends (:mod:`..pool.release`): the holder is
    #: recorded as ended, so that no renewal puts its slot back
    ending: bool = False


@dataclass(frozen=True)
class Renew:
    key: str
    cap: int
    running: Sequence[str] = ()
    waiting: Sequence[str] = ()
    admission: Admission | None = None
    #: the worker's own releases of holders of ``key`` whose runs ended since its last round
    #: (submitted ``later``: its pool process freed the slot, or should have): each holder is
    #: released as :class:`Release` would, or only confirmed when its pool process freed it
    ended: Sequence[Release] = ()


Op = Acquire | Release | Renew


@dataclass
class Outcome:
    """What one operation did: ``granted`` lists this worker's holders of ``key`` granted now
    (the caller itself included, for an acquire); ``restored`` the leases a renewal put back;
    ``reaped`` the holders whose lease expired and which this operation removed (reported as
    lost by the caller, exactly once across the cluster); ``known`` whether a released holder
    held or waited; ``wake_at`` when the key's first waiter is blocked only by time (a rate's
    next token), the Redis time in ms at which to run the key's grant again (a :class:`Renew`),
    and ``clock`` the Redis time in ms when the script ran; ``room``, for an acquire, the slots
    of ``key`` still free after it (the effective cap less the holders)."""

    key: str
    granted: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    known: bool = True
    reaped: list[str] = field(default_factory=list)
    wake_at: int | None = None
    clock: int | None = None
    room: int | None = None


class Codec:
    """Operations to script calls, replies to outcomes, for one worker and prefix."""

    def __init__(self, prefix: str, lease_ttl: float, worker: str) -> None:
        self.prefix = prefix
        self.ttl_ms = int(lease_ttl * 1000)
        self.worker = worker
        self.channel_prefix = grant_channel_prefix(prefix)

    def family(self, key: str) -> Family:
        return Family.of(self.prefix, key)

    def call(self, op: Op) -> tuple[Script, list[str], list[Any]]:
        keys = list(_script_keys(self.prefix, op.key))
        cap = self.spec(op)
        if isinstance(op, Acquire):
            args = [op.key, op.holder, cap, self.ttl_ms, self.channel_prefix, self.worker, op.park]
            return Scripts.get("acquire.lua"), keys, args + _ended(op.ended)
        if isinstance(op, Release):
            waited = -1 if op.waited is None else int(op.waited * 1000)
            args = [op.key, op.holder, cap, self.ttl_ms, self.channel_prefix, self.worker]
            args += [op.outcome, waited, "1" if op.ending else ""]
            return Scripts.get("release.lua"), keys, args
        args = [op.key, cap, self.ttl_ms, self.channel_prefix, self.worker]
        args += [len(op.running), len(op.ended), *op.running, *op.waiting]
        return Scripts.get("renew.lua"), keys, args + _ended(op.ended)

    def spec(self, op: Op) -> str:
        """The cap argument: the cap and the key's admission rules (``admission.spec``)."""
        if isinstance(op, Release) and op.spec:
            return op.spec
        return spec(
            op.cap,
            op.admission,
            rank=op.rank if isinstance(op, Acquire) else None,
            in_family=split_key(op.key)[0] is not None,
        )

    @staticmethod
    def decode(op: Op, reply: Any) -> Outcome:
        if isinstance(op, Acquire):
            granted = _text(reply[3])
            if int(reply[0]):
                granted.insert(0, op.holder)
            room = int(reply[1]) - int(reply[2])
            outcome = Outcome(op.key, granted, reaped=_text(reply[4]), room=room)
            tail = reply[5:]
        elif isinstance(op, Release):
            outcome = Outcome(
                op.key, _text(reply[1]), known=bool(int(reply[0])), reaped=_text(reply[2])
            )
            tail = reply[3:]
        else:
            restored, granted, reaped = reply[:3]
            outcome = Outcome(op.key, _text(granted), _text(restored), reaped=_text(reaped))
            tail = reply[3:]
        if len(tail) >= 2 and int(tail[0]):
            outcome.wake_at, outcome.clock = int(tail[0]), int(tail[1])
        return outcome


class RedisLeases:
    """Runs operations through redis-py, all pending ones in one pipelined round trip."""

    def __init__(self, client: redis.Redis, prefix: str, lease_ttl: float, worker: str) -> None:
        self.client = client
        self.codec = Codec(prefix, lease_ttl, worker)
        self._scripts = {
            name: client.register_script(Scripts.get(name).source)
            for name in ("acquire.lua", "release.lua", "renew.lua")
        }

    def family(self, key: str) -> Family:
        return self.codec.family(key)

    def execute(self, ops: Sequence[Op]) -> list[Outcome]:
        if isinstance(self.client, RedisCluster):
            replies = self._execute_on_nodes(ops)
            return [self.codec.decode(op, reply) for op, reply in zip(ops, replies, strict=True)]
        if len(ops) == 1:  # one EVALSHA, without the pipeline's SCRIPT EXISTS round trip
            script, keys, args = self.codec.call(ops[0])
            return [self.codec.decode(ops[0], self._scripts[script.name](keys, args))]
        pipe = self.client.pipeline(transaction=False)
        for op in ops:
            script, keys, args = self.codec.call(op)
            self._scripts[script.name](keys, args, client=pipe)
        replies = pipe.execute()
        return [self.codec.decode(op, reply) for op, reply in zip(ops, replies, strict=True)]

    def _execute_on_nodes(self, ops: Sequence[Op]) -> list[Any]:
        """Redis Cluster: redis-py refuses scripts in its cluster pipelines, so the operations
        are grouped by the node that holds their family's slot and pipelined to each node.

        A reply that is an error (the slot moved, the node failed over) is retried alone
        through the cluster client, which follows the redirection: every script is safe to
        run again for the same holder.
        """
        cluster: RedisCluster = self.client  # type: ignore[assignment]
        calls = [self.codec.call(op) for op in ops]
        by_node: dict[str, list[int]] = {}
        nodes: dict[str, Any] = {}
        for index, (_, keys, _) in enumerate(calls):
            node = cluster.get_node_from_key(keys[0])  # type: ignore[no-untyped-call]
            nodes[node.name] = node
            by_node.setdefault(node.name, []).append(index)
        replies: list[Any] = [None] * len(ops)
        for name, indexes in by_node.items():
            connection = cluster.get_redis_connection(nodes[name])
            pipe = connection.pipeline(transaction=False)
            for index in indexes:
                script, keys, args = calls[index]
                self._scripts[script.name](keys, args, client=pipe)
            try:
                answers = pipe.execute(raise_on_error=False)
            except ServerChanged:
                raise
            except redis.ConnectionError:
                answers = [None] * len(indexes)  # retried one by one below
            for index, answer in zip(indexes, answers, strict=True):
                replies[index] = answer
        for index, answer in enumerate(replies):
            if answer is None or isinstance(answer, Exception):
                script, keys, args = calls[index]
                replies[index] = self._scripts[script.name](keys, args)
        return replies


@lru_cache(maxsize=4096)
def _script_keys(prefix: str, key: str) -> tuple[str, ...]:
    """The KEYS of every lease script of ``key`` (its family's, then the admission keys), built
    once per key while it is among the 4096 used last."""
    family = Family.of(prefix, key)
    return (*family.all(), *family.admission())


def lease_spec(key: str, cap: int, admission: Admission | None) -> str:
    """The cap argument of a release of ``key``, built where the Admission is known."""
    return spec(cap, admission, in_family=split_key(key)[0] is not None)


def _ended(releases: Sequence[Release]) -> list[Any]:
    """Releases carried by an acquire or a renewal: holder, outcome, waited ms (or -1) each."""
    args: list[Any] = []
    for op in releases:
        args += [op.holder, op.outcome, -1 if op.waited is None else int(op.waited * 1000)]
    return args


def _text(values: Iterable[bytes | str]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]
