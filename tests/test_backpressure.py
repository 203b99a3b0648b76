"""Backpressure at submit (``max_pending``), against a real Redis and real worker processes."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery import Celery

import tests.apps.flow_app  # noqa: F401  (registers the f.* tasks on every app)
from celery_throttled import Backpressure, ConfigurationError, throttled_task
from celery_throttled.status import inspect

from .conftest import Workers, wait_until
from .probes import peak

pytestmark = pytest.mark.timeout(240)


def producer(client: Celery, prefix: str, pending_ttl: float = 600.0) -> Celery:
    """The test's client app, configured as a producer of throttled tasks."""
    client.conf.throttle_key_prefix = prefix
    client.conf.throttle_pending_ttl = pending_ttl
    return client


def pending(client: Celery) -> int:
    status = inspect(client, ["f.bounded"])[0]
    assert status.max_pending == 6
    return int(status.pending or 0)


class Sampler:
    """Reads the pending count every 20 ms in a thread; ``highest`` is the most it saw."""

    def __init__(self, client: Celery) -> None:
        self.client, self.highest, self._stop = client, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.highest = max(self.highest, pending(self.client))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.highest


def test_max_pending_refuses_at_submit_naming_key_and_count(client, prefix):
    """Given max_pending=6 and no worker,
    When seven are submitted, Then the seventh raises Backpressure naming the key and the count,
    and nothing is sent for it; a task re-sent with its own id (a retry) is still admitted:
    a bound not enforced, or a retry refused by its own earlier self, fails here."""
    task = producer(client, prefix).tasks["f.bounded"]
    sent = [task.delay(f"b{i}") for i in range(6)]
    with pytest.raises(Backpressure) as info:
        task.delay("one too many")
    assert (info.value.key, info.value.pending, info.value.max_pending) == ("f.bounded", 6, 6)
    assert "key 'f.bounded' already has 6 tasks pending (max_pending=6)" in str(info.value)
    assert task.apply_async(("again",), task_id=sent[0].id).id == sent[0].id
    assert pending(client) == 6
    from .test_cli import run

    out = run(client, "status", "f.bounded").output
    assert "6/6" in out.splitlines()[1], out  # pending per key
    with client.connection_for_write() as conn:
        assert conn.default_channel.client.llen(prefix) == 7  # the refused one was not sent
    client.control.purge()


def test_max_pending_zero_and_bad_values_are_refused_at_decoration():
    for value in (0, -1, 2.5, "10", True):
        with pytest.raises(ConfigurationError, match=r"api\.bp.*max_pending must be a positive"):

            @throttled_task(limit=1, max_pending=value, name="api.bp")
            def task() -> None: ...


def test_submitting_faster_than_service_is_bounded_and_loses_nothing(
    workers: Workers, client, probe, prefix
):
    """Given limit=2, 0.1 s tasks (20/s of service) and max_pending=6,
    When a producer submits at about ten times the service rate for three seconds,
    Then pending never exceeds 6, every accepted task runs, every refused one was refused at
    submit, and the count is back to 0 at the end: a count that leaks, double counts, or lets
    more than 6 in fails here."""
    task = producer(client, prefix).tasks["f.bounded"]
    workers.start(pool="prefork", concurrency=4)
    workers.start(pool="threads", concurrency=4)
    sampler = Sampler(client)
    accepted: list[Any] = []
    refused = 0
    end = time.monotonic() + 3
    while time.monotonic() < end:
        try:
            accepted.append(task.delay(f"b{len(accepted)}", 0.1))
        except Backpressure:
            refused += 1
        time.sleep(0.005)
    for result in accepted:
        assert result.get(timeout=60).ok
    assert refused > len(accepted)  # the producer really was ten times too fast
    assert peak(probe, prefix, "bounded") <= 2
    wait_until(lambda: pending(client) == 0, 10, what="the last release to leave the count")
    assert sampler.stop() <= 6


def test_killed_workers_and_a_purged_queue_never_make_the_count_drift(
    workers: Workers, client, probe, prefix
):
    """Given max_pending=6 filled by two workers (2 running, 4 held), pending_ttl 3 s,
    When both workers are SIGKILLed, six more are submitted and purged from the queue, and a
    new worker comes up and takes over the dead workers' messages,
    Then the count never exceeds 6, empties by expiry after each loss, follows the redelivered
    messages while they are held and run, and ends at 0 with room for exactly 6 again: a count
    stuck at its highest (trusting releases that never came) or one that forgets what a worker
    really holds fails here."""
    task = producer(client, prefix, pending_ttl=3).tasks["f.bounded"]
    env: dict[str, Any] = {"LEASE_TTL": 1.5, "PENDING_TTL": 3, "VISIBILITY": 6}
    first = [workers.start(pool="prefork", concurrency=3, **env) for _ in range(2)]
    sampler = Sampler(client)
    batch = [task.delay(f"a{i}", 2.0) for i in range(6)]
    wait_until(lambda: peak(probe, prefix, "bounded") == 2, 30, what="two to run")
    with pytest.raises(Backpressure):
        task.delay("full")
    for worker in first:
        worker.kill()
    # nobody vouches for them any more: they leave the count by expiry
    wait_until(lambda: pending(client) == 0, 10, what="the dead workers' tasks to lapse")
    purged = [task.delay(f"p{i}") for i in range(6)]
    with pytest.raises(Backpressure):
        task.delay("full again")
    assert client.control.purge() == 6
    wait_until(lambda: pending(client) == 0, 10, what="the purged tasks to lapse")
    # a new worker takes the dead workers' unacknowledged messages back, and vouches for them
    workers.start(pool="prefork", concurrency=3, **env)
    wait_until(lambda: pending(client) > 0, 30, what="the redelivered tasks to count again")
    for result in batch:  # the held ones run; the two killed mid-run are reported lost
        wait_until(result.ready, 60, what=f"{result.id} to settle")
    assert sum(result.get(timeout=1).ok for result in batch) >= 4
    wait_until(lambda: pending(client) == 0, 10, what="the count to empty")
    assert not any(result.ready() for result in purged)
    highest = sampler.stop()
    print(f"\nhighest pending seen: {highest}")
    assert highest <= 6
    # they run as long as the first batch: a worker that finished some before the seventh is
    # submitted would make room (on a loaded machine the six submissions alone can take that long)
    again = [task.delay(f"c{i}", 2.0) for i in range(6)]
    with pytest.raises(Backpressure):
        task.delay("full at last")
    for result in again:
        assert result.get(timeout=30).ok
