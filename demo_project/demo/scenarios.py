"""The demo's scenarios, started the same way by the web app's buttons and by ``run_demo.py``.

Each returns the ids of what it sent (members in order for the errgroup) and remembers them in
Redis (``{prefix}:recent``) so the dashboard can list recent envelopes.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery_throttled import ErrgroupResult, errgroup

from .celery import PREFIX, app
from .tasks import (
    DOWNSTREAM_CAPACITY,
    DOWNSTREAM_URL,
    best_quote,
    build_report,
    charge,
    charge_adaptive,
    charge_unthrottled,
    notify,
    notify_unthrottled,
    quote,
    quotes_failed,
    risky,
    sync_shared,
    sync_tenant,
)

__all__ = ["SCENARIOS", "Started", "recent_key"]

#: the downstream's capacity in the adaptive scenario, and for how many seconds
ADAPTIVE_STEPS = ((5, 8.0), (12, 8.0), (3, 8.0))

PANICS = ("system_exit", "memory_error", "unserializable", "error", "ok")


@dataclass
class Started:
    name: str
    ids: list[str]
    group: ErrgroupResult | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def recent_key() -> str:
    return f"{PREFIX}:recent"


def _remember(name: str, ids: list[str]) -> None:
    client = app.backend.client
    entries = [json.dumps({"id": task_id, "scenario": name}) for task_id in ids]
    pipe = client.pipeline()
    for i in range(0, len(entries), 500):
        pipe.lpush(recent_key(), *entries[i : i + 500])
    pipe.ltrim(recent_key(), 0, 199)
    pipe.execute()


def burst(size: int = 300, capped: bool = True) -> Started:
    task = charge if capped else charge_unthrottled
    name = "burst-capped" if capped else "burst-uncapped"
    with app.producer_or_acquire() as producer:
        ids = [task.apply_async((i,), producer=producer).id for i in range(size)]
    _remember(name, ids)
    return Started(name, ids)


def fanout(suppliers: int = 9) -> Started:
    """An errgroup of quotes at limit 3; one supplier is broken, so the others are cancelled."""
    members = [quote.s(f"supplier-{i}", broken=(i == 4)) for i in range(suppliers)]
    group = (errgroup(members, limit=3) | best_quote.s()).on_error(quotes_failed.s())
    result = group.apply_async()
    _remember("errgroup", result.member_ids)
    return Started("errgroup", result.member_ids, group=result)


def timeouts() -> Started:
    ids = [
        build_report.delay("cleans-up", 5.0, True).id,
        build_report.delay("runs-on", 5.0, False).id,
    ]
    _remember("timeouts", ids)
    return Started("timeouts", ids)


def panics() -> Started:
    ids = [risky.delay(case).id for case in PANICS]
    _remember("panics", ids)
    return Started("panics", ids, notes={"cases": list(PANICS)})


def tenants(fair: bool, big: int = 200, small: int = 4, each: int = 3) -> Started:
    """One big tenant queues ``big`` syncs, then ``small`` tenants queue ``each``: behind one
    shared key (first come first served) or with fair shares. Notes when each tenant sent."""
    task = sync_tenant if fair else sync_shared
    name = "tenants-fair" if fair else "tenants-shared"
    sent_at: dict[str, float] = {}
    by_tenant: dict[str, list[str]] = {}
    with app.producer_or_acquire() as producer:
        plan = [("acme", big)] + [(f"small-{i}", each) for i in range(small)]
        for tenant, count in plan:
            sent_at[tenant] = time.time()
            by_tenant[tenant] = [
                task.apply_async((tenant, n), producer=producer).id for n in range(count)
            ]
    ids = [task_id for tenant_ids in by_tenant.values() for task_id in tenant_ids]
    _remember(name, ids)
    return Started(name, ids, notes={"sent_at": sent_at, "by_tenant": by_tenant})


def partner(size: int = 100, rated: bool = True) -> Started:
    """``size`` calls to the rate-limited partner, through ``rate=`` or as fast as possible."""
    task = notify if rated else notify_unthrottled
    name = "partner-rated" if rated else "partner-unthrottled"
    with app.producer_or_acquire() as producer:
        ids = [task.apply_async((i,), producer=producer).id for i in range(size)]
    _remember(name, ids)
    return Started(name, ids)


def set_capacity(capacity: int) -> None:
    """Change how many callers the downstream serves at once, while it runs."""
    request = urllib.request.Request(f"{DOWNSTREAM_URL}/capacity?n={capacity}", method="POST")
    with urllib.request.urlopen(request, timeout=5):
        pass


def adaptive(steps: tuple[tuple[int, float], ...] = ADAPTIVE_STEPS, ms: int = 80) -> Started:
    """Charges through an adaptive cap while the downstream's capacity steps (5 -> 12 -> 3), a
    backlog all along; the capacity goes back to ``DOWNSTREAM_CAPACITY`` at the end. Notes when
    each step was taken (``stepped``, filled in as it goes) and the thread that takes them."""
    size = sum(int(capacity * seconds * 1000 / ms) for capacity, seconds in steps)
    stepped: list[tuple[float, int]] = []
    set_capacity(steps[0][0])

    def step() -> None:
        for capacity, seconds in steps:
            set_capacity(capacity)
            stepped.append((time.time(), capacity))
            time.sleep(seconds)
        set_capacity(DOWNSTREAM_CAPACITY)
        stepped.append((time.time(), DOWNSTREAM_CAPACITY))

    with app.producer_or_acquire() as producer:
        ids = [charge_adaptive.apply_async((i, ms), producer=producer).id for i in range(size)]
    thread = threading.Thread(target=step, name="capacity-steps", daemon=True)
    thread.start()
    _remember("adaptive", ids)
    return Started("adaptive", ids, notes={"steps": steps, "stepped": stepped, "thread": thread})


SCENARIOS: dict[str, Callable[[], Started]] = {
    "burst-uncapped": lambda: burst(capped=False),
    "burst-capped": lambda: burst(capped=True),
    "errgroup": fanout,
    "timeouts": timeouts,
    "panics": panics,
    "tenants-shared": lambda: tenants(fair=False),
    "tenants-fair": lambda: tenants(fair=True),
    "partner-unthrottled": lambda: partner(rated=False),
    "partner-rated": lambda: partner(rated=True),
    "adaptive": adaptive,
}
