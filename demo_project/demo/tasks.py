"""The demo's tasks: each one calls the fragile downstream (:mod:`demo.downstream`).

``charge`` goes through a cap equal to the downstream's capacity; ``charge_unthrottled`` is the
same call as a plain ``@shared_task``. ``quote`` is an errgroup member; ``build_report`` meets its
soft and hard timeouts; ``risky`` panics in the ways that take plain Celery workers down.
``sync_shared`` and ``sync_tenant`` sync tenants behind one shared key (first come first served)
or with fair shares; ``notify`` calls the rate-limited partner at its rate, ``notify_unthrottled``
as fast as the workers go. ``charge_adaptive`` charges through an adaptive cap: it finds the
downstream's capacity (and follows it when it changes) from its 503s.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from celery_throttled import Adaptive, Overloaded, RetryPolicy, current_context, throttled_task

DOWNSTREAM_URL = os.environ.get("DOWNSTREAM_URL", "http://127.0.0.1:8081")
DOWNSTREAM_CAPACITY = int(os.environ.get("DOWNSTREAM_CAPACITY", "5"))


class DownstreamError(Exception):
    """The downstream answered with an error (503: over capacity; 500: broken)."""


class DownstreamOverloaded(DownstreamError, Overloaded):
    """The downstream answered 503: over its capacity."""


def call(path: str, **params: Any) -> dict[str, Any]:
    url = f"{DOWNSTREAM_URL}{path}?{urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as exc:
        error = DownstreamOverloaded if exc.code == 503 else DownstreamError
        raise error(f"{path} answered {exc.code}: {exc.read().decode()}") from None


@throttled_task(limit=DOWNSTREAM_CAPACITY, key="payments-api", name="demo.charge")
def charge(order_id: int, ms: int = 80) -> dict[str, Any]:
    """Charge an order: at most DOWNSTREAM_CAPACITY at once across every worker."""
    return call("/pay", order=order_id, ms=ms)


@throttled_task(
    limit=Adaptive(initial=16, min=1, max=32),
    key="payments-adaptive",
    retry=RetryPolicy(on=(Overloaded,), max_attempts=100, backoff=0),
    name="demo.charge_adaptive",
)
def charge_adaptive(order_id: int, ms: int = 80) -> dict[str, Any]:
    """Charge an order through an adaptive cap: a 503 (``Overloaded``) cuts it and is retried."""
    return call("/pay", order=order_id, ms=ms)


@shared_task(name="demo.charge_unthrottled")
def charge_unthrottled(order_id: int, ms: int = 80) -> dict[str, Any]:
    """The same call as a plain task: as many at once as there are worker processes."""
    return call("/pay", order=order_id, ms=ms)


@throttled_task(limit=3, key="suppliers-api", name="demo.quote")
def quote(supplier: str, steps: int = 5, broken: bool = False) -> dict[str, Any]:
    """Ask a supplier for a price in a few calls; a broken supplier fails on its second."""
    ctx = current_context()
    for step in range(steps):
        ctx.check()  # leaves at once when the errgroup is cancelled
        call("/quote", supplier=supplier, ms=100, fail=int(broken and step == 1))
    return {"supplier": supplier, "price": 100 + len(supplier)}


@shared_task(name="demo.best_quote")
def best_quote(quotes: list[dict[str, Any]]) -> dict[str, Any]:
    return min(quotes, key=lambda q: q["price"])


@shared_task(name="demo.quotes_failed")
def quotes_failed(envelope: dict[str, Any]) -> str:
    error = envelope.get("error") or {}
    return f"quotes failed: [{error.get('kind')}] {error.get('message')}"


@throttled_task(
    limit=2, key="reports", soft_timeout=1.0, hard_timeout=2.0, name="demo.build_report"
)
def build_report(name: str, seconds: float, cleans_up: bool = True) -> dict[str, Any]:
    """Work for ``seconds``; at the soft timeout either clean up and return, or carry on."""
    began = time.time()
    try:
        while time.time() < began + seconds:
            time.sleep(0.05)
    except SoftTimeLimitExceeded:
        if cleans_up:
            return {"report": name, "partial": True, "after": round(time.time() - began, 2)}
        while time.time() < began + seconds:  # ignores it: the hard timeout stops it
            time.sleep(0.05)
    return {"report": name, "partial": False}


@throttled_task(limit=4, key="risky", name="demo.risky")
def risky(case: str) -> Any:
    """Fail in the ways that take plain Celery workers (or their callers) down."""
    if case == "system_exit":
        raise SystemExit(3)
    if case == "memory_error":
        raise MemoryError("pretend the heap ran out")
    if case == "unserializable":
        return {1, 2, 3}  # a set: no JSON for it
    if case == "error":
        raise ValueError("an ordinary bug")
    return "fine"


SYNC_LIMIT = 4


@throttled_task(limit=SYNC_LIMIT, key="tenants-api", name="demo.sync_shared")
def sync_shared(tenant: str, n: int, ms: int = 50) -> dict[str, Any]:
    """A tenant's sync behind one key shared by every tenant: first come first served."""
    return call("/sync", tenant=tenant, n=n, ms=ms)


@throttled_task(
    limit=SYNC_LIMIT,
    total=SYNC_LIMIT,
    key=lambda tenant, *args, **kwargs: f"tenant:{tenant}",
    name="demo.sync_tenant",
)
def sync_tenant(tenant: str, n: int, ms: int = 50) -> dict[str, Any]:
    """The same sync with fair shares: tenants take turns within the same total."""
    return call("/sync", tenant=tenant, n=n, ms=ms)


PARTNER_RATE = os.environ.get("PARTNER_RATE", "20/s")


@throttled_task(rate=PARTNER_RATE, key="partner-api", name="demo.notify")
def notify(n: int, ms: int = 10) -> dict[str, Any]:
    """Notify the rate-limited partner: at most its rate, across every worker."""
    return call("/notify", n=n, ms=ms)


@shared_task(name="demo.notify_unthrottled")
def notify_unthrottled(n: int, ms: int = 10) -> dict[str, Any]:
    """The same call as a plain task: as fast as the workers go."""
    return call("/notify", n=n, ms=ms)
