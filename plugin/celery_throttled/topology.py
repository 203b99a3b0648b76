"""Which Redis the limiter talks to, named by ``throttle_redis_url``.

::

    redis://[[user]:password@]host[:port][/db]       one server
    rediss://…?ssl_ca_certs=/path/ca.pem             the same over TLS (redis-py's ssl_* options)
    unix:///path/redis.sock?db=0                     a unix socket
    redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/<service>[/db]
                                                     the master Sentinel names for <service>,
                                                     followed across failovers
    rediss+sentinel://…                              the same over TLS (sentinels and master)
    redis+cluster://[[user]:password@]host:port[,host:port…]
                                                     a Redis Cluster, found from these nodes
    rediss+cluster://…                               the same over TLS

For Sentinel, ``?sentinel_password=…`` (and ``sentinel_username``) authenticate to the sentinels
when they need it, and ``ssl_*`` options apply to both; the URL's credentials are the master's.
``throttle_redis_options`` adds keyword arguments to every client (``ssl_cert_reqs``,
``socket_keepalive``…).

Only ``redis://`` over TCP runs on the worker's event loop (:mod:`.transport.eventloop`); every
other form goes through redis-py on two threads (:mod:`.transport.threads`), which follows a
failover. In a Cluster every script touches one slot (each key family shares a hash tag); lease
operations are pipelined per node (:meth:`.transport.leases.RedisLeases.execute`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from .errors import ConfigurationError

__all__ = ["SCHEMES", "Topology", "mask"]

SINGLE = ("redis", "rediss", "unix", "redis+socket")
SENTINEL = ("redis+sentinel", "rediss+sentinel")
CLUSTER = ("redis+cluster", "rediss+cluster")
SCHEMES = SINGLE + SENTINEL + CLUSTER
_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class Topology:
    """A parsed ``throttle_redis_url``."""

    url: str
    kind: str  # "single", "sentinel" or "cluster"
    tls: bool
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str, options: dict[str, Any] | None = None) -> Topology:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in SCHEMES:
            raise ConfigurationError(
                f"throttle_redis_url must start with one of {', '.join(s + '://' for s in SCHEMES)}"
                f"; got {mask(url)!r}"
            )
        kind = "sentinel" if scheme in SENTINEL else "cluster" if scheme in CLUSTER else "single"
        topology = cls(url, kind, scheme.startswith("rediss"), dict(options or {}))
        if kind == "sentinel":
            topology._sentinel_parts()  # validate now, not in the worker's first second
        elif kind == "cluster":
            topology._cluster_parts()
        return topology

    @property
    def on_event_loop(self) -> bool:
        """Whether the worker's event loop can speak to it directly (plain TCP, one server)."""
        return self.kind == "single" and self.url.startswith("redis://")

    def client(self, **options: Any) -> redis.Redis:
        """A redis-py client (for Sentinel: of the current master, re-resolved on failover)."""
        options = {**self.options, **options}
        if self.kind == "single":
            url = self.url
            if url.startswith("redis+socket://"):  # kombu's spelling of a unix socket
                url = "unix://" + url.removeprefix("redis+socket://")
            return redis.Redis.from_url(url, **options)
        if self.kind == "cluster":
            nodes, node_options = self._cluster_parts()
            cluster = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in nodes],  # type: ignore[no-untyped-call]
                **{**node_options, **options},
            )
            return cast(redis.Redis, cluster)  # it speaks the same commands, routed by slot
        hosts, service, master_options, sentinel_options = self._sentinel_parts()
        sentinel_options = {
            **{k: v for k, v in options.items() if k.startswith(("socket_", "ssl"))},
            **sentinel_options,
        }
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs=sentinel_options, **master_options
        )
        client: redis.Redis = sentinel.master_for(service, **options)  # type: ignore[no-untyped-call]
        return client

    def _cluster_parts(self) -> tuple[list[tuple[str, int]], dict[str, Any]]:
        parts = urlsplit(self.url)
        credentials, nodes = self._hosts(parts.netloc, 6379, "cluster node")
        path = [p for p in parts.path.split("/") if p]
        if not nodes or path not in ([], ["0"]):
            raise ConfigurationError(
                "throttle_redis_url: a Cluster URL names one or more nodes and no database "
                f"other than 0, as redis+cluster://host:7000,host:7001; got {mask(self.url)!r}"
            )
        options = self._credentials(credentials)
        for name, value in parse_qsl(parts.query):
            if not name.startswith("ssl_"):
                raise ConfigurationError(
                    f"throttle_redis_url: a Cluster URL takes ssl_* options in its query, not "
                    f"{name!r}; give other client options in throttle_redis_options"
                )
            options[name] = value
        if self.tls:
            options["ssl"] = True
        return nodes, options

    def _hosts(
        self, netloc: str, default_port: int, what: str
    ) -> tuple[str, list[tuple[str, int]]]:
        at = netloc.rsplit("@", 1)
        credentials, hostlist = (at[0], at[1]) if len(at) == 2 else ("", at[0])
        hosts = []
        for item in filter(None, hostlist.split(",")):
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
            try:
                hosts.append((host or item, int(port) if port else default_port))
            except ValueError:
                raise ConfigurationError(
                    f"throttle_redis_url: bad {what} address {item!r} in {mask(self.url)!r}"
                ) from None
        return credentials, hosts

    @staticmethod
    def _credentials(credentials: str) -> dict[str, Any]:
        user, _, password = credentials.partition(":")
        options: dict[str, Any] = {}
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
        return options

    def _sentinel_parts(
        self,
    ) -> tuple[list[tuple[str, int]], str, dict[str, Any], dict[str, Any]]:
        parts = urlsplit(self.url)
        credentials, hosts = self._hosts(parts.netloc, _SENTINEL_PORT, "sentinel")
        path = [unquote(p) for p in parts.path.split("/") if p]
        if not hosts or not path:
            raise ConfigurationError(
                "throttle_redis_url: a Sentinel URL names its sentinels and the service, as "
                "redis+sentinel://host:26379,host2:26379/mymaster[/db]; got "
                f"{mask(self.url)!r}"
            )
        master: dict[str, Any] = {}
        if len(path) > 1:
            if not path[1].isdigit():
                raise ConfigurationError(
                    f"throttle_redis_url: the database must be a number, got {path[1]!r}"
                )
            master["db"] = int(path[1])
        master.update(self._credentials(credentials))
        sentinel: dict[str, Any] = {}
        for name, value in parse_qsl(parts.query):
            if name in ("sentinel_password", "sentinel_username"):
                sentinel[name.removeprefix("sentinel_")] = value
            elif name.startswith("ssl_"):
                master[name] = value
            else:
                raise ConfigurationError(
                    f"throttle_redis_url: a Sentinel URL takes ssl_*, sentinel_password and "
                    f"sentinel_username in its query, not {name!r}; give other client options "
                    "in throttle_redis_options"
                )
        if self.tls:
            master["ssl"] = sentinel["ssl"] = True
            for name in [k for k in master if k.startswith("ssl_")]:
                sentinel[name] = master[name]
        return hosts, path[0], master, sentinel


def mask(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url
