"""Where and how the event loop connects to the limiter's Redis: as redis-py would.

:meth:`Endpoint.of` reads a redis-py connection built from the same URL and
``throttle_redis_options`` as every other limiter client (never connecting it), so the address,
database, credentials, ``client_name``, TCP keepalive and its options, and both timeouts are the
ones redis-py resolved. :func:`unsupported` names the options the event loop cannot apply; the
worker then uses the threaded transport instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis
from redis.credentials import UsernamePasswordCredentialProvider

__all__ = ["Command", "Endpoint", "unsupported"]

Command = tuple[Any, ...]

#: options the event loop applies itself
HONOURED = frozenset(
    {
        "db", "username", "password", "credential_provider", "client_name", "protocol",
        "socket_keepalive", "socket_keepalive_options", "socket_timeout",
        "socket_connect_timeout", "socket_type",
    }
)  # fmt: skip
#: options about redis-py's own client, not the connection: the transport reconnects, retries
#: and watches for silent servers by itself
CLIENT_SIDE = frozenset(
    {
        "retry", "retry_on_timeout", "retry_on_error", "health_check_interval", "encoding",
        "encoding_errors", "decode_responses", "socket_read_size", "max_connections",
        "single_connection_client",
    }
)  # fmt: skip


def unsupported(url: str, options: dict[str, Any], client: redis.Redis) -> list[str]:
    """The options (of ``throttle_redis_options`` or the URL's query) the event loop cannot
    honour; empty when it honours them all."""
    given = set(options) | {name for name, _ in parse_qsl(urlsplit(url).query)}
    refused = sorted(given - HONOURED - CLIENT_SIDE)
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if pool.connection_class is not redis.connection.Connection:
        refused.append(f"connection_class={pool.connection_class.__name__}")
    if kwargs.get("protocol") not in (None, 2, "2"):
        refused.append(f"protocol={kwargs['protocol']}")
    provider = kwargs.get("credential_provider")
    if provider is not None and type(provider) is not UsernamePasswordCredentialProvider:
        refused.append(f"credential_provider={type(provider).__name__}")
    return refused


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect, as redis-py resolved it."""

    host: str
    port: int
    family: int
    handshake: tuple[Command, ...]
    keepalive: dict[int, Any] | None
    connect_timeout: float | None
    reply_timeout: float | None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def of(cls, client: redis.Redis) -> Endpoint:
        pool = client.connection_pool
        conn: Any = pool.connection_class(**pool.connection_kwargs)  # never connected
        handshake: list[Command] = []
        provider = conn.credential_provider
        if provider is None and (conn.username or conn.password):
            provider = UsernamePasswordCredentialProvider(conn.username, conn.password)
        if provider is not None:
            handshake.append(("AUTH", *provider.get_credentials()))
        if conn.client_name:
            handshake.append(("CLIENT", "SETNAME", conn.client_name))
        if conn.db:
            handshake.append(("SELECT", int(conn.db)))
        return cls(
            str(conn.host),
            int(conn.port),
            int(conn.socket_type),
            tuple(handshake),
            dict(conn.socket_keepalive_options) if conn.socket_keepalive else None,
            conn.socket_connect_timeout,
            conn.socket_timeout,
        )
