"""The lease transport: how one worker's lease operations reach Redis and its grants come back.

:func:`build` chooses the implementation. The event loop (:mod:`.eventloop`) when the worker
runs kombu's hub and the limiter's Redis is a plain TCP server; otherwise (TLS, unix sockets,
Sentinel, Cluster, or a worker without an event loop) two threads (:mod:`.threads`). Both
implement :class:`~.base.Transport` and report through :class:`~.base.Callbacks`; the lease
scripts and their codec are in :mod:`.leases`.
"""

from __future__ import annotations

import atexit
import logging
from typing import Any

import redis
from redis.connection import parse_url

from ..keys import errgroup_channel, grant_channel, registry
from ..settings import Settings
from ..topology import mask
from .base import Callbacks, Transport
from .eventloop import EventLoopTransport
from .leases import RedisLeases
from .threads import ThreadedTransport

__all__ = ["Callbacks", "Transport", "build"]

logger = logging.getLogger(__name__)


def build(
    settings: Settings,
    hub: Any,
    store: RedisLeases,
    client: redis.Redis,
    worker: str,
    callbacks: Callbacks,
) -> Transport:
    """The transport for this worker (``hub``: its event loop, or None); stopped, its queue
    sent, when the process exits."""
    transport: Transport
    if hub is not None and settings.topology.on_event_loop:
        transport = EventLoopTransport(
            hub=hub,
            codec=store.codec,
            sync_store=store,
            params=parse_url(settings.redis_url),  # type: ignore[no-untyped-call]
            channels=(
                grant_channel(settings.key_prefix, worker),
                errgroup_channel(settings.key_prefix),
            ),
            lease_ttl=settings.lease_ttl,
            callbacks=callbacks,
            registry=registry(settings.key_prefix),
            where=mask(settings.redis_url),
        )
    else:
        transport = ThreadedTransport(
            store=store,
            client=client,
            prefix=settings.key_prefix,
            worker=worker,
            lease_ttl=settings.lease_ttl,
            callbacks=callbacks,
            where=mask(settings.redis_url),
        )
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
