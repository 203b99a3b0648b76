"""What the limiter knows, per key, read from Redis: for ``celery throttle`` and for Python.

``inspect(app)`` lists every key in use (or the ones asked for): the cap and where it comes
from, running and waiting (per worker), the holders, the runs that ended by outcome, and wait
percentiles over the last 1000 admissions; the rate and the starts it let through in the last
full second; the family and its total; the tasks pending (``max_pending``). ``set_cap`` /
``set_rate`` / ``reset_cap`` change a key's cap or rate across the cluster at once: workers
read them inside every acquire, and raising one grants waiters immediately.

A key of a family is named by its key alone when no other family has a key of that name, else
as ``FAMILY/KEY``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from .admission import UNCAPPED, Rate
from .errors import ConfigurationError, ThrottleError
from .keys import Family, family_key, grant_channel_prefix, node_of, registry, split_key, task_of
from .settings import Settings
from .transport.scripts import Scripts
from .worker.outcomes import report_lost

__all__ = ["Holder", "KeyStatus", "UnknownKey", "inspect", "reset_cap", "set_cap", "set_rate"]


class UnknownKey(ThrottleError, KeyError):
    """No throttled task has used this key (within the registry's memory)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown key"


@dataclass(frozen=True)
class Holder:
    task_id: str
    worker: str
    age: float  # seconds since the lease was last taken or renewed


@dataclass
class KeyStatus:
    key: str
    cap: int | None
    cap_source: str  # "decorator", "adaptive" or "override" (a pin)
    declared: int | None
    override: int | None
    running: int
    waiting: int
    waiting_by_worker: dict[str, int] = field(default_factory=dict)
    holders: list[Holder] = field(default_factory=list)
    done: int = 0
    failed: int = 0
    retried: int = 0
    rejected: int = 0
    wait_p50: float | None = None  # seconds
    wait_p99: float | None = None
    #: the rate ("50/s"), where it comes from ("decorator" or "override"), and the starts it
    #: let through in the last full second
    rate: str | None = None
    rate_source: str | None = None
    rate_used: int = 0
    #: the family the key belongs to, its total and how many of its keys' tasks run
    family: str | None = None
    total: int | None = None
    family_running: int | None = None
    #: tasks submitted and not yet finished (``max_pending``), and the bound
    pending: int | None = None
    max_pending: int | None = None
    #: an adaptive cap (``limit=Adaptive(...)``): its bounds, its value (a float: the cap is its
    #: floor, or the pin), why it last moved and how long ago (s), and how long admissions stay
    #: paused by a SlowDown (s)
    adaptive_min: int | None = None
    adaptive_max: int | None = None
    adaptive_cap: float | None = None
    adaptive_why: str | None = None
    adaptive_moved: float | None = None
    paused: float | None = None

    @property
    def pressure(self) -> float:
        """How hard the key is pushing against its cap: (running + waiting) / cap."""
        return (self.running + self.waiting) / self.cap if self.cap else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["pressure"] = round(self.pressure, 3)
        return data


def _client(app: Any) -> tuple[redis.Redis, Settings]:
    settings = Settings.from_app(app)
    client = settings.client(socket_timeout=5, socket_connect_timeout=2, decode_responses=True)
    return client, settings


def known_keys(client: redis.Redis, prefix: str) -> list[str]:
    return [str(k) for k in client.zrange(registry(prefix), 0, -1)]


def inspect(app: Any, keys: list[str] | None = None) -> list[KeyStatus]:
    """The status of ``keys`` (default: every key in use), most pressed first."""
    return _inspect(*_client(app), keys)


def resolve(client: redis.Redis, prefix: str, key: str) -> str:
    """The limiter's name of ``key`` (``keys.family_key``); UnknownKey when none is in use."""
    known = known_keys(client, prefix)
    if key in known:
        return key
    named = [name for name in known if split_key(name)[0] is not None and split_key(name)[1] == key]
    if "/" in key and not named:
        named = [name for name in known if name == family_key(*key.split("/", 1))]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        families = ", ".join(sorted(str(split_key(name)[0]) for name in named))
        raise UnknownKey(f"key {key!r} is in several families ({families}): name it FAMILY/KEY")
    if client.exists(Family.of(prefix, key).meta):
        return key
    raise UnknownKey(f"unknown key {key!r}: no throttled task has used it")


def _inspect(client: redis.Redis, settings: Settings, keys: list[str] | None) -> list[KeyStatus]:
    prefix = settings.key_prefix
    wanted = [resolve(client, prefix, key) for key in keys] if keys else known_keys(client, prefix)
    seconds, micros = client.time()  # outside the pipeline: Cluster pipelines refuse TIME
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    pipe = client.pipeline(transaction=False)
    for key in wanted:
        family = Family.of(prefix, key)
        pipe.hgetall(family.meta)
        pipe.zrange(family.holders, 0, -1, withscores=True)
        pipe.zrange(family.waiters, 0, -1)
        pipe.lrange(family.waits, 0, -1)
        pipe.hgetall(family.total)
        pipe.zcount(family.pending, now_ms, "+inf")
    replies = pipe.execute()
    ttl_ms = settings.lease_ttl * 1000
    statuses = []
    for i, key in enumerate(wanted):
        meta, holders, waiters, waits, shared, pending = replies[6 * i : 6 * i + 6]
        status = _status(key, meta, holders, waiters, waits, now_ms, ttl_ms)
        _admission(status, key, meta, shared, int(pending), now_ms)
        _adaptive(status, meta, now_ms)
        statuses.append(status)
    return sorted(statuses, key=lambda s: (-s.pressure, s.family or "", s.key))


def _admission(
    status: KeyStatus,
    name: str,
    meta: dict[str, str],
    shared: dict[str, str],
    pending: int,
    now_ms: int,
) -> None:
    """The rate, family and pending parts of a key's status."""
    rate = meta.get("rate_override") or meta.get("rate")
    if rate:
        status.rate = str(Rate.decode(rate))
        status.rate_source = "override" if meta.get("rate_override") else "decorator"
        at, n, before = (int(x) for x in meta.get("use", "0 0 0").split())
        second = now_ms // 1000
        status.rate_used = before if at == second else n if at == second - 1 else 0
    family, status.key = split_key(name)
    if family is not None:
        status.family = family
        total = shared.get("override") or shared.get("total")
        status.total = int(total) if total else None
        status.family_running = int(shared.get("running", 0))
    if meta.get("max_pending"):
        status.max_pending = int(meta["max_pending"])
        status.pending = pending


def _adaptive(status: KeyStatus, meta: dict[str, str], now_ms: int) -> None:
    """The adaptive part of a key's status (its cap moves between bounds)."""
    if not meta.get("acap"):
        return
    status.adaptive_min, status.adaptive_max = int(meta["amin"]), int(meta["amax"])
    status.adaptive_cap = round(float(meta["acap"]), 3)
    status.adaptive_why = meta.get("awhy")
    if meta.get("amoved"):
        status.adaptive_moved = round(max(0, now_ms - int(meta["amoved"])) / 1000, 3)
    if int(meta.get("apause") or 0) > now_ms:
        status.paused = round((int(meta["apause"]) - now_ms) / 1000, 3)
    if status.override is None:
        status.cap, status.cap_source = int(float(meta["acap"])), "adaptive"


def _status(
    key: str,
    meta: dict[str, str],
    holders: list[tuple[str, float]],
    waiters: list[str],
    waits: list[str],
    now_ms: int,
    ttl_ms: float,
) -> KeyStatus:
    declared = int(meta["cap"]) if meta.get("cap") else None
    override = int(meta["override"]) if meta.get("override") else None
    if declared is not None and declared >= UNCAPPED:
        declared = None  # a rate or a family's total, and no cap of its own
    live = [(h, score) for h, score in holders if score > now_ms]
    samples = sorted(int(w) / 1000 for w in waits)
    return KeyStatus(
        key=key,
        cap=override if override is not None else declared,
        cap_source="override" if override is not None else "decorator",
        declared=declared,
        override=override,
        running=len(live),
        waiting=len(waiters),
        waiting_by_worker=dict(Counter(node_of(w) for w in waiters)),
        holders=[
            Holder(task_of(h), node_of(h), round(max(0.0, ttl_ms - (score - now_ms)) / 1000, 3))
            for h, score in live
        ],
        done=int(meta.get("done", 0)),
        failed=int(meta.get("failed", 0)),
        retried=int(meta.get("retried", 0)),
        rejected=int(meta.get("rejected", 0)),
        wait_p50=_percentile(samples, 0.50),
        wait_p99=_percentile(samples, 0.99),
    )


def _percentile(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    return samples[min(len(samples) - 1, int(q * len(samples)))]


_KEEP = "="


def set_cap(app: Any, key: str, cap: int | None) -> KeyStatus:
    """Override ``key``'s cap across the cluster (``None``: back to the decorator's cap).

    On an adaptive key the override pins the cap: it wins until :func:`reset_cap`, and the
    adaptive cap stays where it was meanwhile."""
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigurationError(f"key {key!r}: a cap must be a positive integer, got {cap!r}")
    return _override(app, key, "" if cap is None else str(cap), _KEEP)


def set_rate(app: Any, key: str, rate: str | float | None) -> KeyStatus:
    """Override ``key``'s rate across the cluster ("50/s", "100/m", a number per second;
    ``None``: back to the decorator's rate). Its burst stays the declared one (1 if none)."""
    if rate is None:
        return _override(app, key, _KEEP, "")
    try:
        parsed = Rate.parse(rate)
    except ValueError:
        raise ConfigurationError(
            f"key {key!r}: a rate must be a positive number per second or a string like "
            f"'20/s', '100/m', '5/h', got {rate!r}"
        ) from None
    client, settings = _client(app)
    meta = Family.of(settings.key_prefix, resolve(client, settings.key_prefix, key)).meta
    declared = client.hget(meta, "rate")
    burst = Rate.decode(str(declared)).burst if declared else 1
    return _override(app, key, _KEEP, Rate(parsed.per_second, burst).encode())


def reset_cap(app: Any, key: str) -> KeyStatus:
    """Drop ``key``'s live overrides (cap and rate): back to what its tasks declare."""
    return _override(app, key, "", "")


def _override(app: Any, key: str, cap: str, rate: str) -> KeyStatus:
    client, settings = _client(app)
    name = resolve(client, settings.key_prefix, key)
    family = Family.of(settings.key_prefix, name)
    script = client.register_script(Scripts.get("set_cap.lua").source)
    args: list[str | int] = [
        name,
        cap,
        int(settings.lease_ttl * 1000),
        grant_channel_prefix(settings.key_prefix),
        rate,
        " f" if split_key(name)[0] is not None else "",
    ]
    _, _, reaped = script(family.all() + family.admission(), args)
    if reaped:
        report_lost(app, name, [str(h) for h in reaped])
    return _inspect(client, settings, [name])[0]
