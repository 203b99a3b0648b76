"""Every Redis key and channel name the limiter uses, built in one place.

All keys of one throttle key (a *family*) share a Redis Cluster hash tag, so each Lua script
touches a single slot::

    {prefix}:{<key>}:h    ZSET  holders: member "<worker> <task id>", score = lease expiry (ms)
    {prefix}:{<key>}:w    ZSET  waiters: member as above, score = ticket (FIFO order)
    {prefix}:{<key>}:we   ZSET  waiter liveness: member as above, score = expiry (ms)
    {prefix}:{<key>}:m    HASH  meta: cap (declared), override (live cap), seq (ticket counter),
                                done / failed (runs ended, by outcome)
    {prefix}:{<key>}:wt   LIST  the last 1000 waits for a slot, in ms (newest first)
    {prefix}:{<key>}:e    ZSET  ended: holders whose pool process freed their slot as the body
                                ended, score = when they are forgotten (ms, one lease TTL on);
                                a renewal from the worker's main process never puts them back,
                                and the worker's own release of one (carried by its next
                                acquire or renewal of the key) removes it; the set expires
                                one lease TTL after its last entry
    {prefix}:{<key>}:p    ZSET  pending (``max_pending``): member task id, score = the time it
                                stops counting unless a worker vouches for it again (ms)
    {prefix}:{<key>}:pk   HASH  parked waiters (``pool/parking.py``): holder -> nonce, set by
                                the acquire that put it in line (or by ``park.lua``); a grant
                                to one pushes "go" onto its park list; an entry goes as its
                                holder leaves the line; expires a day after the last mark
    {prefix}:{<key>}:b    ZSET  bodies of an adaptive key running now (``lua/body.lua``): member
                                holder, score = when it stops counting unless its run ends first
                                (ms, one lease TTL on)
    {prefix}:{<key>}:pk:<holder>:<nonce>
                          LIST  a parked waiter's park list, which its pool process blocks
                                on: "go" (run the body) or "off" (leave, unrun); it expires
                                one lease TTL after its last push

A key's meta also keeps its rate (``rate``, ``rate_override``: "<interval ms>/<burst>"), the
rate's theoretical arrival time (``tat``, ms), the starts in the last two seconds (``use``),
who was told to wake when the next token is due (``wake``), ``max_pending`` and, in a family,
``served`` (the family's turn when it was last served), ``counted`` (its holders as last
counted into the family's running total), ``weight`` (turns in a row, when above 1) and
``streak`` (turns taken in a row so far). An adaptive key's meta keeps its cap (``acap``, a
float: the cap is its floor), bounds (``abounds``, ``amin``, ``amax``), slow start's end
(``athresh``), the last ceiling and cut (``aceil``, ``acut``), its latencies (``ashort``,
``abase``), a pause (``apause``, ms), why and when it last moved (``awhy``, ``amoved``) and its
cuts (``acuts``): ``lua/adapt.lua`` keeps them.

The keys of a task with ``total`` form one family (the task's name, or ``family=``) and share
the family's hash tag instead of their own, so one script can hand a freed slot to any key of
the family. Their names carry the family (``family_key``: "<family>\x1f<key>")::

    {prefix}:{fam:<family>}:k:<key>:h, …:w, …:we, …:m, …:wt, …:e, …:p, …:pk, …:b  as above
    {prefix}:{fam:<family>}:t   HASH  total (declared), override, running (holders of every
                                      key), turn (round-robin counter), wake
    {prefix}:{fam:<family>}:q   ZSET  keys with waiters: member key, score = its last turn
                                      (least recently served first)

A key outside a family has the same two as unused names (``{prefix}:{<key>}:ft``, ``:fq``),
so every lease script gets the same KEYS.
    {prefix}:grant:<worker>     pub/sub channel on which a worker hears of slots granted to it
                                (and of wake-ups found by its pool processes' releases)
    {prefix}:keys         ZSET  every key in use: member key, score = last seen (epoch s); lets
                                any worker reap the leases of a dead one, and tools list keys;
                                keys unseen for a week leave it

An errgroup's state is one family too, under the hash tag ``{eg:<group id>}``, every key with
the group's expiry (``throttle_errgroup_ttl``)::

    {prefix}:{eg:<gid>}:s   HASH  n, limit, terminate, body, errback, parent, cancelled (the
                                  reason), first_error (a task id), errback_sent
    {prefix}:{eg:<gid>}:m   LIST  member task ids, in member order
    {prefix}:{eg:<gid>}:st  SET   members that started (admitted to a pool)
    {prefix}:{eg:<gid>}:se  SET   members that settled (their envelope is written)
    {prefix}:{eg:<gid>}:d   LIST  one element once every member settled (callers block on it)
    {prefix}:egtask:<task id>  SET  errgroups started inside that task (cancelled with it)
    {prefix}:egof:<task id>    STR  the errgroup of a started member (for lost-worker reports)
    {prefix}:errgroup          pub/sub channel: {"cancel": <gid>} when an errgroup is cancelled
    errgroup:<gid>             the throttle key of an errgroup's own ``limit``
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ERRGROUP_KEY_PREFIX",
    "Family",
    "GroupKeys",
    "errgroup_channel",
    "family_key",
    "grant_channel",
    "grant_channel_prefix",
    "group_of_task",
    "holder_id",
    "node_of",
    "registry",
    "split_key",
    "task_groups",
    "task_of",
]


@dataclass(frozen=True)
class Family:
    """The Redis keys of one throttle key."""

    holders: str
    waiters: str
    waiter_expiry: str
    meta: str
    waits: str
    ended: str

    #: pending task ids, then the family's total and turns (see the table above)
    pending: str = ""
    total: str = ""
    turns: str = ""
    #: waiters parked in idle pool processes (``pool/parking.py``); each one's park list is
    #: :meth:`park_list`
    parked: str = ""
    #: the bodies of an adaptive key running now (``lua/body.lua``, ``lua/adapt.lua``)
    bodies: str = ""

    @classmethod
    def of(cls, prefix: str, key: str) -> Family:
        family, name = split_key(key)
        if family is None:
            base = f"{prefix}:{{{key}}}"
            shared = base + ":f"
        else:
            shared = f"{prefix}:{{fam:{family}}}:"
            base = f"{shared}k:{name}"
        return cls(
            f"{base}:h",
            f"{base}:w",
            f"{base}:we",
            f"{base}:m",
            f"{base}:wt",
            f"{base}:e",
            f"{base}:p",
            f"{shared}t",
            f"{shared}q",
            f"{base}:pk",
            f"{base}:b",
        )

    def park_list(self, holder: str, nonce: str) -> str:
        """The list a parked waiter's pool process blocks on ("go" or "off"); ``nonce`` is
        the value of the holder's entry in :attr:`parked`, fresh each time it is parked."""
        return f"{self.parked}:{holder}:{nonce}"

    def all(self) -> list[str]:
        return [self.holders, self.waiters, self.waiter_expiry, self.meta, self.waits, self.ended]

    def admission(self) -> list[str]:
        """The keys ``lua/admission.lua`` finds at the end of every lease script's KEYS."""
        return [self.pending, self.total, self.turns]


#: separates a family from a key in the name the limiter uses for a key of a family
FAMILY_SEPARATOR = "\x1f"


def family_key(family: str | None, key: str) -> str:
    """The limiter's name of ``key``: the key itself, or "<family>\x1f<key>" in a family."""
    return key if family is None else f"{family}{FAMILY_SEPARATOR}{key}"


def split_key(name: str) -> tuple[str | None, str]:
    """``family_key`` in reverse: (family or None, key)."""
    family, sep, key = name.partition(FAMILY_SEPARATOR)
    return (family, key) if sep else (None, name)


#: throttle keys of errgroups' own limits start with this
ERRGROUP_KEY_PREFIX = "errgroup:"


@dataclass(frozen=True)
class GroupKeys:
    """The Redis keys of one errgroup."""

    state: str
    members: str
    started: str
    settled: str
    done: str

    @classmethod
    def of(cls, prefix: str, gid: str) -> GroupKeys:
        base = f"{prefix}:{{eg:{gid}}}"
        return cls(f"{base}:s", f"{base}:m", f"{base}:st", f"{base}:se", f"{base}:d")

    def all(self) -> list[str]:
        return [self.state, self.members, self.started, self.settled, self.done]


def errgroup_channel(prefix: str) -> str:
    return f"{prefix}:errgroup"


def task_groups(prefix: str, task_id: str) -> str:
    return f"{prefix}:egtask:{task_id}"


def group_of_task(prefix: str, task_id: str) -> str:
    return f"{prefix}:egof:{task_id}"


def grant_channel_prefix(prefix: str) -> str:
    return f"{prefix}:grant:"


def grant_channel(prefix: str, worker: str) -> str:
    return grant_channel_prefix(prefix) + worker


def holder_id(worker: str, task_id: str) -> str:
    """A lease holder: the worker token (which never contains a space) and the task id."""
    return f"{worker} {task_id}"


def registry(prefix: str) -> str:
    return f"{prefix}:keys"


def task_of(holder: str) -> str:
    """The task id in a holder id (``holder_id`` in reverse)."""
    return holder.split(" ", 1)[1] if " " in holder else holder


def node_of(holder: str) -> str:
    """The worker's node name in a holder id (the worker token without its pid and nonce)."""
    return holder.split(" ", 1)[0].split("/", 1)[0] if " " in holder else "?"
