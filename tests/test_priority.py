"""Celery's priority orders the waiters of a key, in the broker's own sense."""

from __future__ import annotations

import pytest
from celery import Celery

import tests.apps.flow_app  # noqa: F401  (registers the f.* tasks on every app)
from celery_throttled import ConfigurationError

from .conftest import Workers, make_client, wait_until
from .probes import leases, started

pytestmark = pytest.mark.timeout(240)

#: (label, priority) in the order they are sent, behind a task holding the only slot
SENT = [("p5", 5), ("p9a", 9), ("p0a", 0), ("p3", 3), ("p0b", 0), ("none", None), ("p9b", 9)]


def waiters_in_priority_order(client: Celery, probe, prefix: str) -> list[str]:
    """Send SENT behind a holder of the only slot; once all wait, free it; the start order."""
    blocker = client.send_task("f.prio", ("blocker", True))
    wait_until(
        lambda: (
            started(probe, prefix, "prio") == []
            and leases(probe, prefix, "prio") == {"holders": 1, "waiters": 0}
        ),
        30,
        what="the blocker to hold the slot",
    )
    results = []
    for label, priority in SENT:
        options = {} if priority is None else {"priority": priority}
        results.append(client.send_task("f.prio", (label,), **options))
    wait_until(
        lambda: leases(probe, prefix, "prio")["waiters"] == len(SENT),
        30,
        what="every task to wait for the slot",
    )
    probe.rpush(f"{prefix}:probe:release", "go")
    for result in [blocker, *results]:
        result.get(timeout=60)
    return [label for label, _ in started(probe, prefix, "prio")][1:]


def test_on_redis_priority_zero_goes_first_fifo_within_a_priority(
    workers: Workers, client, probe, prefix
):
    """Given a Redis broker and a key capped at 1, held,
    When seven tasks wait with priorities 5, 9, 0, 3, 0, none, 9 (in that order),
    Then they start 0, 0, none (0 to Redis), 3, 5, 9, 9, first come first served within a
    priority: waiters served in arrival order, or the broker's sense reversed, fails here."""
    workers.start(pool="threads", concurrency=10)
    assert waiters_in_priority_order(client, probe, prefix) == [
        "p0a",
        "p0b",
        "none",
        "p3",
        "p5",
        "p9a",
        "p9b",
    ]


@pytest.mark.rabbitmq
def test_on_rabbitmq_the_highest_priority_goes_first(
    workers: Workers, probe, prefix, redis_url, rabbitmq_url
):
    """Given a RabbitMQ broker, the same waiters start 9, 9, 5, 3, 0, 0, none (no priority is
    0 to RabbitMQ), first come first served within a priority: Redis's sense applied to
    RabbitMQ fails here."""
    rabbit = make_client(rabbitmq_url, redis_url, prefix)
    try:
        workers.client = rabbit
        workers.start(pool="threads", concurrency=10, BROKER_URL=rabbitmq_url)
        assert waiters_in_priority_order(rabbit, probe, prefix) == [
            "p9a",
            "p9b",
            "p5",
            "p3",
            "p0a",
            "p0b",
            "none",
        ]
    finally:
        rabbit.close()


@pytest.mark.parametrize("priority", [-1, 10, 255, 2.5, "high", True])
def test_a_priority_outside_celerys_range_is_refused_when_sent(client, prefix, priority):
    """Given a throttled task, When it is sent with a priority outside 0-9, Then
    ConfigurationError names the task and the value, and nothing is sent."""
    task = client.tasks["f.prio"]
    with pytest.raises(
        ConfigurationError, match=r"f\.prio.*priority must be an int from 0 to 9"
    ) as info:
        task.apply_async(("x",), priority=priority)
    assert repr(priority) in str(info.value)
