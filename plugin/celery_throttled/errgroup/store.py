"""An errgroup's state in Redis: register, start, settle, cancel; each step one atomic script.

Why the start step is a script of its own (a member racing a cancellation)::

    t0  member 7 is granted its slots and handed to a pool process
    t1  member 3 fails: eg_settle marks the group cancelled and lists the members that have not
        started, member 7 among them, and writes their "cancelled" envelopes
    t2  member 7's pool process runs eg_start: the group is cancelled and member 7 settled,
        so it returns without running and without writing anything

Had member 7 run eg_start at t0.5 instead, eg_settle would not have listed it: it is running,
it sees ``current_context().cancelled`` and settles itself. Either way every member gets exactly one
envelope, and the group completes when the settled set reaches ``n``.

Key names are in :mod:`celery_throttled.keys`; the scripts in ``errgroup/lua/eg_*.lua``, with
``eg_lib.lua`` prepended.
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.cluster import RedisCluster

from ..keys import (
    ERRGROUP_KEY_PREFIX,
    Family,
    GroupKeys,
    errgroup_channel,
    group_of_task,
    task_groups,
)
from ..settings import process_client

__all__ = ["GroupStore", "Settled", "store_for"]

#: eg_start.lua's answers
STARTED, ALREADY_SETTLED, CANCELLED, UNKNOWN = 1, 0, 2, -1


@dataclass(frozen=True)
class Settled:
    """What one member's settle did to its group (see ``lua/eg_settle.lua``)."""

    counted: bool
    cancelled_now: bool
    errback: dict[str, Any] | None
    body: dict[str, Any] | None
    victims: list[str]


@cache
def _source(name: str) -> str:
    lua = resources.files(__package__).joinpath("lua")
    return lua.joinpath("eg_lib.lua").read_text() + "\n" + lua.joinpath(name).read_text()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GroupStore:
    """Errgroup state under one prefix, with one expiry."""

    def __init__(self, client: redis.Redis, prefix: str, ttl: float) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = max(1, int(ttl))
        self.channel = errgroup_channel(prefix)
        self._start = client.register_script(_source("eg_start.lua"))
        self._settle = client.register_script(_source("eg_settle.lua"))
        self._cancel = client.register_script(_source("eg_cancel.lua"))

    def keys(self, gid: str) -> GroupKeys:
        return GroupKeys.of(self.prefix, gid)

    def register(
        self,
        gid: str,
        members: list[tuple[str, str]],
        *,
        limit: int | None,
        terminate: bool,
        body: dict[str, Any] | None,
        errback: dict[str, Any] | None,
        parent_task: str | None,
    ) -> None:
        """Write a new group: its members (task id, task name) in order, and its options."""
        keys = self.keys(gid)
        state: dict[Any, Any] = {
            "n": len(members),
            "names": json.dumps([name for _, name in members]),
            "limit": "" if limit is None else limit,
            "terminate": int(terminate),
            "parent": parent_task or "",
            "created": time.time(),
        }
        if body is not None:
            state["body"] = json.dumps(body)
        if errback is not None:
            state["errback"] = json.dumps(errback)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(keys.state, mapping=state)
        pipe.expire(keys.state, self.ttl)
        if members:
            pipe.rpush(keys.members, *[task_id for task_id, _ in members])
            pipe.expire(keys.members, self.ttl)
        if limit is not None:
            # the family of the group's own throttle key expires with the group
            family = Family.of(self.prefix, ERRGROUP_KEY_PREFIX + gid)
            pipe.hset(family.meta, mapping={"cap": limit, "expire": self.ttl})
            pipe.expire(family.meta, self.ttl)
        if parent_task:
            pipe.sadd(task_groups(self.prefix, parent_task), gid)
            pipe.expire(task_groups(self.prefix, parent_task), self.ttl)
        pipe.execute()

    def start(self, gid: str, task_id: str) -> int:
        """May this member start? One of STARTED, ALREADY_SETTLED, CANCELLED, UNKNOWN."""
        if isinstance(self.client, RedisCluster):  # no scripts in Cluster pipelines
            answer = self._start(keys=self.keys(gid).all(), args=[task_id, self.ttl])
            self.client.set(group_of_task(self.prefix, task_id), gid, ex=self.ttl)
            return int(answer)
        pipe = self.client.pipeline(transaction=False)
        self._start(keys=self.keys(gid).all(), args=[task_id, self.ttl], client=pipe)
        pipe.set(group_of_task(self.prefix, task_id), gid, ex=self.ttl)
        answer, _ = pipe.execute()
        return int(answer)

    def peek(self, gid: str, task_id: str) -> tuple[bool, bool]:
        """(is the group cancelled, has this member settled), without recording anything."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hexists(self.keys(gid).state, "cancelled")
        pipe.sismember(self.keys(gid).settled, task_id)
        cancelled, settled = pipe.execute()
        return bool(cancelled), bool(settled)

    def settle(self, gid: str, task_id: str, ok: bool, reason: str) -> Settled:
        args = [task_id, "1" if ok else "0", self.ttl, self.channel, gid, reason]
        status, cancelled_now, errback, body, victims = self._settle(
            keys=self.keys(gid).all(), args=args
        )
        return Settled(
            counted=int(status) == 1,
            cancelled_now=bool(int(cancelled_now)),
            errback=json.loads(errback) if errback else None,
            body=json.loads(body) if body else None,
            victims=[_text(v) for v in victims],
        )

    def cancel(self, gid: str, reason: str) -> tuple[int, list[str]]:
        """Cancel from outside: (1 now / 0 already / -1 unknown, members that never start)."""
        status, victims = self._cancel(
            keys=self.keys(gid).all(), args=[reason, self.ttl, self.channel, gid]
        )
        return int(status), [_text(v) for v in victims]

    def finish_empty(self, gid: str) -> None:
        """A group of no members is complete as soon as it is registered."""
        done = self.keys(gid).done
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(done, "1")
        pipe.expire(done, self.ttl)
        pipe.execute()

    def done(self, gid: str) -> bool:
        """Whether every member has settled."""
        return bool(self.client.exists(self.keys(gid).done))

    def first_error(self, gid: str) -> str | None:
        """The task id of the first member that did not succeed, if any."""
        value = self.client.hget(self.keys(gid).state, "first_error")
        return None if value is None else _text(value)

    def state(self, gid: str) -> dict[str, str]:
        raw = self.client.hgetall(self.keys(gid).state)
        return {_text(k): _text(v) for k, v in raw.items()}

    def cancelled(self, gid: str) -> bool:
        return bool(self.client.hexists(self.keys(gid).state, "cancelled"))

    def cancelled_among(self, gids: list[str]) -> set[str]:
        pipe = self.client.pipeline(transaction=False)
        for gid in gids:
            pipe.hexists(self.keys(gid).state, "cancelled")
        return {gid for gid, yes in zip(gids, pipe.execute(), strict=True) if yes}

    def settled_among(self, gid: str, task_ids: list[str]) -> set[str]:
        if not task_ids:
            return set()
        answers = self.client.smismember(self.keys(gid).settled, task_ids)
        return {task_id for task_id, yes in zip(task_ids, answers, strict=True) if yes}

    def members(self, gid: str) -> list[str]:
        return [_text(v) for v in self.client.lrange(self.keys(gid).members, 0, -1)]

    def started(self, gid: str) -> list[str]:
        return [_text(v) for v in self.client.smembers(self.keys(gid).started)]

    def settled_count(self, gid: str) -> int:
        return int(self.client.scard(self.keys(gid).settled))

    def wait(self, gid: str, timeout: float | None) -> bool:
        """Block until every member settled (True) or ``timeout`` seconds pass (False).

        The done list holds one element once complete; BLMOVE rotates it onto itself, so any
        number of callers can wait on the same group.
        """
        done = self.keys(gid).done
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                return self.done(gid)
            # whole seconds for servers before 6.0; short waits poll the list instead
            if left >= 1.0:
                if self.client.brpoplpush(done, done, timeout=1) is not None:
                    return True
            elif self.done(gid):
                return True
            else:
                time.sleep(min(left, 0.02))

    def children_of(self, task_id: str) -> list[str]:
        """Errgroups started inside the run of ``task_id``."""
        return [_text(v) for v in self.client.smembers(task_groups(self.prefix, task_id))]

    def group_of(self, task_id: str) -> str | None:
        value = self.client.get(group_of_task(self.prefix, task_id))
        return None if value is None else _text(value)


_stores: weakref.WeakKeyDictionary[Any, tuple[int, GroupStore]] = weakref.WeakKeyDictionary()
_stores_lock = threading.Lock()


def store_for(app: Any) -> GroupStore:
    """This process's :class:`GroupStore` for ``app`` (pool children get their own)."""
    with _stores_lock:
        known = _stores.get(app)
        if known is not None and known[0] == os.getpid():
            return known[1]
        client, settings = process_client(app)
        store = GroupStore(client, settings.key_prefix, settings.errgroup_ttl)
        _stores[app] = (os.getpid(), store)
        return store
