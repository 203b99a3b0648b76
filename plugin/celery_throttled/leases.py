"""Slot leases in Redis: acquire, release, renew, each one atomic Lua script.

A *lease* is a slot of a throttle key held by one holder (a worker and a task id) until an
expiry that the holder's worker keeps pushing forward. Why a lease and not a counter::

    t0  worker A takes a slot for task 1            holders = {A/1 until t0+30s}
    t1  worker A is SIGKILLed; nobody releases
    t2  the lease passes its expiry                 the next acquire or release reaps it
    t3  a waiter anywhere in the cluster gets it

A counter would have leaked the slot at t1 forever. Waiting holders queue in Redis too, in
ticket order, so the oldest waiter in the cluster is served first and no worker starves.

The scripts live in ``lua/`` with a KEYS/ARGV/returns header each; ``grant.lua`` is shared.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import redis

from .keys import Family, grant_channel_prefix

__all__ = [
    "Acquire",
    "LeaseStore",
    "RedisLeases",
    "Release",
    "Renew",
    "RenewResult",
]


@dataclass(frozen=True)
class Acquire:
    key: str
    holder: str
    cap: int


@dataclass(frozen=True)
class Release:
    key: str
    holder: str
    cap: int


@dataclass(frozen=True)
class Renew:
    key: str
    cap: int
    running: Sequence[str] = ()
    waiting: Sequence[str] = ()


@dataclass
class RenewResult:
    restored: list[str] = field(default_factory=list)
    granted: list[str] = field(default_factory=list)


Op = Acquire | Release | Renew


class LeaseStore(Protocol):
    """Where leases live. Every method runs its operations in one round trip, in order.

    ``execute`` returns, per operation: for :class:`Acquire` whether the slot was granted;
    for :class:`Release` whether the holder was known; for :class:`Renew` a
    :class:`RenewResult`. Each operation is atomic on its own.
    """

    def execute(self, ops: Sequence[Op]) -> list[Any]: ...

    def ping(self) -> None: ...


def _script(name: str) -> str:
    lua = resources.files(__package__).joinpath("lua")
    return lua.joinpath("grant.lua").read_text() + "\n" + lua.joinpath(name).read_text()


class RedisLeases:
    """The Redis implementation of :class:`LeaseStore`."""

    def __init__(self, client: redis.Redis, prefix: str, lease_ttl: float) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_ms = int(lease_ttl * 1000)
        self.channel_prefix = grant_channel_prefix(prefix)
        self._acquire = client.register_script(_script("acquire.lua"))
        self._release = client.register_script(_script("release.lua"))
        self._renew = client.register_script(_script("renew.lua"))

    def family(self, key: str) -> Family:
        return Family.of(self.prefix, key)

    def ping(self) -> None:
        self.client.ping()

    def execute(self, ops: Sequence[Op]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for op in ops:
            keys = self.family(op.key).all()
            if isinstance(op, Acquire):
                self._acquire(keys, self._args(op.key, op.holder, op.cap), client=pipe)
            elif isinstance(op, Release):
                self._release(keys, self._args(op.key, op.holder, op.cap), client=pipe)
            else:
                args: list[Any] = [op.key, op.cap, self.ttl_ms, self.channel_prefix]
                args += [len(op.running), *op.running, *op.waiting]
                self._renew(keys, args, client=pipe)
        replies = pipe.execute()
        return [self._decode(op, reply) for op, reply in zip(ops, replies, strict=True)]

    def _args(self, key: str, holder: str, cap: int) -> list[Any]:
        return [key, holder, cap, self.ttl_ms, self.channel_prefix]

    @staticmethod
    def _decode(op: Op, reply: Any) -> Any:
        if isinstance(op, Acquire):
            return bool(int(reply[0]))
        if isinstance(op, Release):
            return bool(int(reply))
        restored, granted = reply
        return RenewResult(_text(restored), _text(granted))


def _text(values: Iterable[bytes | str]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]
