"""What the limiter knows, per key, read from Redis: for ``celery throttle`` and for Python.

``inspect(app)`` lists every key in use (or the ones asked for): the cap and where it comes
from, running and waiting (per worker), the holders, the runs that ended by outcome, and wait
percentiles over the last 1000 admissions. ``set_cap`` / ``reset_cap`` change a key's cap
across the cluster at once: workers read it inside every acquire, and raising it grants
waiters immediately.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from .errors import ConfigurationError, ThrottleError
from .keys import Family, grant_channel_prefix, node_of, registry, task_of
from .settings import Settings
from .transport.leases import Scripts
from .worker.outcomes import report_lost

__all__ = ["Holder", "KeyStatus", "UnknownKey", "inspect", "reset_cap", "set_cap"]


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
    cap_source: str  # "decorator" or "override"
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


def _inspect(client: redis.Redis, settings: Settings, keys: list[str] | None) -> list[KeyStatus]:
    known = known_keys(client, settings.key_prefix)
    for key in keys or ():
        if key not in known and not client.exists(Family.of(settings.key_prefix, key).meta):
            raise UnknownKey(f"unknown key {key!r}: no throttled task has used it")
    wanted = list(keys) if keys else known
    pipe = client.pipeline(transaction=False)
    for key in wanted:
        family = Family.of(settings.key_prefix, key)
        pipe.hgetall(family.meta)
        pipe.zrange(family.holders, 0, -1, withscores=True)
        pipe.zrange(family.waiters, 0, -1)
        pipe.lrange(family.waits, 0, -1)
    replies = pipe.execute()
    seconds, micros = client.time()  # outside the pipeline: Cluster pipelines refuse TIME
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    ttl_ms = settings.lease_ttl * 1000
    statuses = []
    for i, key in enumerate(wanted):
        meta, holders, waiters, waits = replies[4 * i : 4 * i + 4]
        statuses.append(_status(key, meta, holders, waiters, waits, now_ms, ttl_ms))
    return sorted(statuses, key=lambda s: (-s.pressure, s.key))


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


def set_cap(app: Any, key: str, cap: int | None) -> KeyStatus:
    """Override ``key``'s cap across the cluster (``None``: back to the decorator's cap)."""
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigurationError(f"key {key!r}: a cap must be a positive integer, got {cap!r}")
    client, settings = _client(app)
    family = Family.of(settings.key_prefix, key)
    if key not in known_keys(client, settings.key_prefix) and not client.exists(family.meta):
        raise UnknownKey(f"unknown key {key!r}: no throttled task has used it")
    script = client.register_script(Scripts.get("set_cap.lua").source)
    args = [
        key,
        "" if cap is None else cap,
        int(settings.lease_ttl * 1000),
        grant_channel_prefix(settings.key_prefix),
    ]
    _, _, reaped = script(family.all(), args)
    if reaped:
        report_lost(app, key, [str(h) for h in reaped])
    return _inspect(client, settings, [key])[0]


def reset_cap(app: Any, key: str) -> KeyStatus:
    """Drop ``key``'s live override: back to the cap its tasks declare."""
    return set_cap(app, key, None)
