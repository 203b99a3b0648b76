"""The lease transport: how one worker's lease operations reach Redis and its grants come back.

:func:`build` chooses the implementation: the event loop (:mod:`.eventloop`) when the worker
runs kombu's hub, the limiter's Redis is a plain TCP server and the event loop can honour every
``throttle_redis_options``; otherwise (TLS, unix sockets, Sentinel, Cluster, such options, or a
worker without an event loop) two threads (:mod:`.threads`). Both implement
:class:`~.base.Transport`, which decides what is sent when, and report through
:class:`~.reports.Callbacks`; the lease scripts and their codec are in :mod:`.leases`.
"""

from __future__ import annotations

import atexit
import logging
from typing import Any

from redis.backoff import NoBackoff
from redis.retry import Retry

from ..settings import Settings
from ..topology import mask
from .base import Transport
from .endpoint import unsupported
from .eventloop import EventLoopTransport
from .reports import Callbacks
from .threads import ThreadedTransport

__all__ = ["CONNECTION", "Callbacks", "Transport", "build"]

logger = logging.getLogger(__name__)

#: the transports' connection settings, unless ``throttle_redis_options`` says otherwise
CONNECTION: dict[str, Any] = {
    "socket_timeout": 5.0,
    "socket_connect_timeout": 2.0,
    "health_check_interval": 10,
}


def build(settings: Settings, *, hub: Any, worker: str, callbacks: Callbacks) -> Transport:
    """The transport for this worker; stopped (its queue sent) when the process exits."""
    topology = settings.topology
    options = {**CONNECTION, **settings.redis_options}
    common: dict[str, Any] = {
        "prefix": settings.key_prefix,
        "worker": worker,
        "lease_ttl": settings.lease_ttl,
        "callbacks": callbacks,
        "where": mask(settings.redis_url),
    }
    transport: Transport | None = None
    if hub is not None and topology.on_event_loop:
        client = topology.client(**options)
        refused = unsupported(settings.redis_url, settings.redis_options, client)
        if refused:
            logger.warning(
                "celery-throttled: the worker's event loop cannot apply %s (throttle_redis_url "
                "or throttle_redis_options): lease operations go through two threads instead",
                ", ".join(refused),
            )
        else:
            transport = EventLoopTransport(hub=hub, client=client, **common)
    if transport is None:
        login = options.get("redis_connect_func")
        if login is None and topology.kind != "cluster":  # a Cluster client logs in itself

            def login(connection: Any) -> None:
                connection.on_connect()

        def connect(on_connect: Any) -> Any:
            own = {"redis_connect_func": on_connect, "retry": Retry(NoBackoff(), 0)}
            return topology.client(**{**options, **own})

        transport = ThreadedTransport(connect=connect, login=login, **common)
    atexit.register(transport.stop)
    logger.info(
        "celery-throttled: worker %s uses the limiter at %s (prefix %r, lease TTL %.1fs, "
        "through the %s)",
        worker,
        mask(settings.redis_url),
        settings.key_prefix,
        settings.lease_ttl,
        transport.name,
    )
    return transport
