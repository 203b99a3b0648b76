"""Every ``throttle_*`` setting, read once from ``app.conf``, validated and documented.

With Django's ``app.config_from_object("django.conf:settings", namespace="CELERY")`` the same
settings are spelled ``CELERY_THROTTLE_REDIS_URL`` and so on.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis

from .errors import ConfigurationError
from .topology import Topology, mask

__all__ = ["DEFAULTS", "Settings", "process_client", "read_max_result_bytes"]

logger = logging.getLogger(__name__)

#: name -> (default, meaning). The settings page (docs/reference/settings.md) mirrors this.
DEFAULTS: dict[str, tuple[Any, str]] = {
    "throttle_redis_url": (
        None,
        "Redis for the limiter: redis://, rediss:// (TLS), unix://, redis+sentinel://, "
        "rediss+sentinel://, redis+cluster:// or rediss+cluster:// (see docs/guide/redis.md). "
        "Default: "
        "the broker URL when it is Redis (or Celery's sentinel:// with master_name), else the "
        "result backend when it is; otherwise the worker refuses to start.",
    ),
    "throttle_redis_options": (
        None,
        "Extra keyword arguments for every limiter Redis client and connection, the event "
        "loop's included (a dict: client_name, socket_keepalive, ssl_cert_reqs…).",
    ),
    "throttle_key_prefix": ("throttle", "Prefix of every Redis key and channel the limiter uses."),
    "throttle_lease_ttl": (
        30.0,
        "Seconds a slot lease lives without renewal; the worker renews every TTL/3. A dead "
        "worker's slots come back after at most this long.",
    ),
    "throttle_max_hold": (
        None,
        "Seconds a worker may hold an unacknowledged message while it waits for a slot before "
        "handing it back to the broker. Default: 80 % of the Redis transport's "
        "visibility_timeout, capped at 25 minutes (under RabbitMQ's 30-minute consumer_timeout).",
    ),
    "throttle_max_held": (
        1000,
        "Messages one worker may hold while they wait, beyond its prefetch window. Past this, "
        "held messages occupy the ordinary prefetch window instead of widening it.",
    ),
    "throttle_max_result_bytes": (
        16 * 1024 * 1024,
        "Largest encoded return value a throttled task may store; a larger one settles as an "
        "error envelope (ResultTooLarge) instead of failing in the broker or backend.",
    ),
    "throttle_metrics_port": (
        None,
        "Port on which each worker serves Prometheus metrics (needs the 'metrics' extra); "
        "None: no metrics server.",
    ),
    "throttle_metrics_addr": ("127.0.0.1", "Address the metrics server binds to."),
    "throttle_sweep_interval": (
        0.25,
        "Seconds between checks of held messages for revocation, expiry and max_hold.",
    ),
    "throttle_errgroup_ttl": (
        86400.0,
        "Seconds an errgroup's state lives in Redis after its last change; a member whose "
        "message arrives later runs untracked (with a warning).",
    ),
    "throttle_park": (
        False,
        "On a prefork worker, write the oldest waiters to pool processes that would sit idle, "
        "where they wait for their grant and start the moment it is made (a hand-off without "
        "the worker's dispatch); a process is given back as soon as other work needs it. "
        "Costs one Redis command per parked task (its pool process's BLPOP). False: waiters "
        "wait only in the worker's main process.",
    ),
    "throttle_pending_ttl": (
        600.0,
        "Seconds a task of a max_pending task counts as pending after it was submitted, or "
        "after a worker holding or running it last vouched for it (every lease_ttl/3): a task "
        "whose message was purged, lost or expired stops counting after at most this long.",
    ),
}

_RABBITMQ_CONSUMER_TIMEOUT_GUARD = 25 * 60.0


def _is_redis(url: Any) -> bool:
    return isinstance(url, str) and url.split("://", 1)[0] in {"redis", "rediss", "redis+socket"}


@dataclass(frozen=True)
class Settings:
    redis_url: str
    key_prefix: str
    lease_ttl: float
    max_hold: float
    max_held: int
    sweep_interval: float
    max_result_bytes: int
    metrics_port: int | None
    metrics_addr: str
    errgroup_ttl: float = DEFAULTS["throttle_errgroup_ttl"][0]
    redis_options: dict[str, Any] = field(default_factory=dict)
    pending_ttl: float = DEFAULTS["throttle_pending_ttl"][0]
    park: bool = DEFAULTS["throttle_park"][0]

    @property
    def topology(self) -> Topology:
        return Topology.parse(self.redis_url, self.redis_options)

    def client(self, **options: Any) -> redis.Redis:
        """A limiter Redis client, whatever the topology."""
        return self.topology.client(**options)

    @classmethod
    def from_app(cls, app: Any) -> Settings:
        conf = app.conf

        def get(name: str) -> Any:
            return _read(conf, name)

        redis_url = get("throttle_redis_url")
        if redis_url is None:
            broker = conf.broker_url or ""
            backend = conf.result_backend or ""
            broker_sentinel = _from_kombu_sentinel(broker, conf.broker_transport_options)
            backend_sentinel = _from_kombu_sentinel(
                backend, conf.get("result_backend_transport_options")
            )
            if _is_redis(broker):
                redis_url = broker
            elif broker_sentinel:
                redis_url = broker_sentinel
            elif _is_redis(backend):
                redis_url = backend
            elif backend_sentinel:
                redis_url = backend_sentinel
            else:
                raise ConfigurationError(
                    "celery-throttled needs a Redis for its limiter: set throttle_redis_url "
                    "(CELERY_THROTTLE_REDIS_URL under Django) to a redis:// URL; neither the "
                    f"broker ({mask(broker)!r}) nor the result backend ({mask(backend)!r}) "
                    "is Redis"
                )
            logger.info("throttle_redis_url not set: the limiter uses %s", mask(redis_url))
        if not isinstance(redis_url, str):
            raise ConfigurationError(f"throttle_redis_url must be a URL, got {redis_url!r}")
        redis_options = get("throttle_redis_options") or {}
        if not isinstance(redis_options, dict):
            raise ConfigurationError(
                f"throttle_redis_options must be a dict of client options, got {redis_options!r}"
            )
        Topology.parse(redis_url, redis_options)  # refuses what it cannot use, naming it
        prefix = get("throttle_key_prefix")
        if not isinstance(prefix, str) or not prefix or " " in prefix:
            raise ConfigurationError(
                f"throttle_key_prefix must be a non-empty string without spaces, got {prefix!r}"
            )
        lease_ttl = _positive("throttle_lease_ttl", get("throttle_lease_ttl"))
        max_hold = get("throttle_max_hold")
        if max_hold is None:
            options = conf.broker_transport_options or {}
            visibility = options.get("visibility_timeout", 3600.0)
            max_hold = min(0.8 * float(visibility), _RABBITMQ_CONSUMER_TIMEOUT_GUARD)
        max_hold = _positive("throttle_max_hold", max_hold)
        max_held = get("throttle_max_held")
        if isinstance(max_held, bool) or not isinstance(max_held, int) or max_held < 0:
            raise ConfigurationError(f"throttle_max_held must be an integer >= 0, got {max_held!r}")
        sweep = _positive("throttle_sweep_interval", get("throttle_sweep_interval"))
        max_result = read_max_result_bytes(conf)
        port = get("throttle_metrics_port")
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
        ):
            raise ConfigurationError(
                f"throttle_metrics_port must be a TCP port (1-65535) or None, got {port!r}"
            )
        addr = get("throttle_metrics_addr")
        if not isinstance(addr, str) or not addr:
            raise ConfigurationError(f"throttle_metrics_addr must be an address, got {addr!r}")
        errgroup_ttl = _positive("throttle_errgroup_ttl", get("throttle_errgroup_ttl"))
        pending_ttl = _positive("throttle_pending_ttl", get("throttle_pending_ttl"))
        park = get("throttle_park")
        if not isinstance(park, bool):
            raise ConfigurationError(f"throttle_park must be True or False, got {park!r}")
        return cls(
            redis_url,
            prefix,
            lease_ttl,
            max_hold,
            max_held,
            sweep,
            max_result,
            port,
            addr,
            errgroup_ttl,
            dict(redis_options),
            pending_ttl,
            park,
        )


def _read(conf: Any, name: str) -> Any:
    """A setting as configured (Django's upper-case spelling too), else its default."""
    value = conf.get(name)
    if value is None:
        value = conf.get(name.upper())
    return DEFAULTS[name][0] if value is None else value


def read_max_result_bytes(conf: Any) -> int:
    """``throttle_max_result_bytes``, validated: read alone where the task runs, which needs
    no other setting (and no Redis)."""
    value = _read(conf, "throttle_max_result_bytes")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"throttle_max_result_bytes must be a positive integer, got {value!r}"
        )
    return value


def _from_kombu_sentinel(url: Any, options: Any) -> str | None:
    """Celery's own Sentinel configuration (``sentinel://h1:26379;sentinel://h2:26379`` with
    ``master_name`` in the transport options) as a ``redis+sentinel://`` URL, or None."""
    if not isinstance(url, str) or not url.startswith("sentinel://"):
        return None
    master = (options or {}).get("master_name")
    if not master:
        return None
    parts = [urlsplit(item) for item in url.split(";") if item.strip()]
    hosts = ",".join(f"{p.hostname}:{p.port or 26379}" for p in parts)
    first = parts[0]
    login = f"{first.username or ''}:{first.password}@" if first.password else ""
    database = first.path.strip("/") or "0"
    return f"redis+sentinel://{login}{hosts}/{master}/{database}"


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


_process_clients: weakref.WeakKeyDictionary[Any, tuple[int, redis.Redis, Settings]] = (
    weakref.WeakKeyDictionary()
)
_process_lock = threading.Lock()


def process_client(app: Any) -> tuple[redis.Redis, Settings]:
    """This process's limiter client for ``app`` (5 s socket timeout, 2 s to connect), with the
    app's settings: one per process and app, shared by what talks to the limiter outside the
    lease transport (the submit check, errgroups, adaptive feedback). A forked pool child makes
    its own: a connection is never shared across a fork."""
    with _process_lock:
        known = _process_clients.get(app)
        if known is not None and known[0] == os.getpid():
            return known[1], known[2]
        settings = Settings.from_app(app)
        client = settings.client(socket_timeout=5, socket_connect_timeout=2)
        _process_clients[app] = (os.getpid(), client, settings)
        return client, settings
