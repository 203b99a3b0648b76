"""A real worker's Prometheus scrape matches the workload it ran."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Workers, free_port, wait_until
from .probes import started
from .test_envelope import envelope

pytestmark = pytest.mark.timeout(120)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def test_metrics_scrape_matches_the_workload(workers: Workers, client: Celery, probe, prefix):
    """Given a worker serving metrics, while 2 capped tasks run and 4 wait, then its gauges say
    2 running and some waiting; afterwards its counters and histograms match what ran: 6 started
    and done, the waits of the 4 that queued, one failed, one rejected, and a task retried
    twice counted as 2 "retried" and 1 "done". Catches: gauges stuck at 0, a wait histogram fed
    zeros, and retries counted as failures or not at all."""
    port = free_port()
    workers.start(pool="prefork", concurrency=4, METRICS_PORT=port)
    # Given 6 capped tasks of 1 s at a cap of 2
    capped = [client.send_task("t.limited", (f"x{i}", 1.0)) for i in range(6)]

    def loaded() -> bool:
        m = scrape(port)
        return (
            m.get(key("celery_throttle_running", key="t.limited")) == 2
            and (m.get(key("celery_throttle_waiting", key="t.limited")) or 0) >= 2
        )

    # Then while they queue the gauges show the load
    wait_until(loaded, 20, what="the gauges to show 2 running and others waiting")
    for r in capped:
        assert envelope(client, r).ok
    # Given one that failed, one retried twice, and one rejected by its wait policy
    assert not envelope(client, client.send_task("t.panic", ("error",))).ok
    retried = envelope(client, client.send_task("t.retrying", ("r",)))
    assert retried.ok and retried.attempts == 3
    busy = client.send_task("t.sleeper", ("busy", 1.0))
    wait_until(lambda: started(probe, prefix, "sleepy"), 30, what="the busy task to start")
    rejected = envelope(client, client.send_task("t.reject_when_full", ("no",)))
    assert rejected.error is not None and rejected.error.kind == "rejected"
    assert envelope(client, busy).ok

    def settled() -> dict[Any, float]:
        m = scrape(port)
        return (
            m
            if m.get(key("celery_throttle_finished_total", key="sleepy", outcome="done")) == 1
            else {}
        )

    # Then the worker's own metrics say exactly that
    m = wait_until(settled, 10, what="the last release to be counted")
    assert m[key("celery_throttle_started_total", key="t.limited")] == 6
    assert m[key("celery_throttle_finished_total", key="t.limited", outcome="done")] == 6
    assert m[key("celery_throttle_finished_total", key="t.panic", outcome="failed")] == 1
    assert m[key("celery_throttle_finished_total", key="policy", outcome="retried")] == 2
    assert m[key("celery_throttle_finished_total", key="policy", outcome="done")] == 1
    assert key("celery_throttle_finished_total", key="policy", outcome="failed") not in m
    assert m[key("celery_throttle_rejected_total", key="sleepy")] == 1
    assert m[key("celery_throttle_wait_seconds_count", key="t.limited")] == 6
    # the 4 that queued waited at least one whole run (1 s) each
    assert m[key("celery_throttle_wait_seconds_sum", key="t.limited")] >= 4 * 0.5 * 0.9
    assert m[key("celery_throttle_run_seconds_count", key="t.limited")] == 6
    assert m[key("celery_throttle_run_seconds_sum", key="t.limited")] >= 6 * 0.1
    assert m[key("celery_throttle_cap", key="t.limited")] == 2
    assert m[key("celery_throttle_running", key="t.limited")] == 0
    assert m[key("celery_throttle_waiting", key="t.limited")] == 0


def test_metrics_listen_on_the_configured_address(workers: Workers, client: Celery):
    """Given ``throttle_metrics_addr="127.0.0.2"``, then the worker's metrics answer on that
    address and not on 127.0.0.1. Catches: the setting read but the server bound to the
    default address."""
    port = free_port()
    workers.start(pool="threads", concurrency=2, METRICS_PORT=port, METRICS_ADDR="127.0.0.2")
    assert envelope(client, client.send_task("t.limited", ("x", 0.0))).ok
    text = urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5).read().decode()
    assert 'celery_throttle_started_total{key="t.limited"} 1.0' in text
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
