"""A real worker's Prometheus scrape matches the workload it ran."""

from __future__ import annotations

import urllib.request

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


def test_metrics_scrape_matches_the_workload(workers: Workers, client: Celery, probe, prefix):
    port = free_port()
    workers.start(pool="prefork", concurrency=4, METRICS_PORT=port)
    # Given 6 capped tasks that ran, one that failed, and one rejected by its wait policy
    for r in [client.send_task("t.limited", (f"x{i}", 0.1)) for i in range(6)]:
        assert envelope(client, r).ok
    assert not envelope(client, client.send_task("t.panic", ("error",))).ok
    busy = client.send_task("t.sleeper", ("busy", 1.0))
    wait_until(lambda: started(probe, prefix, "sleepy"), 30, what="the busy task to start")
    rejected = envelope(client, client.send_task("t.reject_when_full", ("no",)))
    assert rejected.error is not None and rejected.error.kind == "rejected"
    assert envelope(client, busy).ok

    def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return name, tuple(sorted(labels.items()))

    def settled() -> dict:
        m = scrape(port)
        return m if m.get(key("celery_throttle_finished_total", key="sleepy",
                              outcome="done")) == 1 else {}

    # Then the worker's own metrics say exactly that
    m = wait_until(settled, 10, what="the last release to be counted")
    assert m[key("celery_throttle_started_total", key="t.limited")] == 6
    assert m[key("celery_throttle_finished_total", key="t.limited", outcome="done")] == 6
    assert m[key("celery_throttle_finished_total", key="t.panic", outcome="failed")] == 1
    assert m[key("celery_throttle_rejected_total", key="sleepy")] == 1
    assert m[key("celery_throttle_wait_seconds_count", key="t.limited")] == 6
    assert m[key("celery_throttle_run_seconds_count", key="t.limited")] == 6
    assert m[key("celery_throttle_run_seconds_sum", key="t.limited")] >= 6 * 0.1
    assert m[key("celery_throttle_cap", key="t.limited")] == 2
    assert m[key("celery_throttle_running", key="t.limited")] == 0
    assert m[key("celery_throttle_waiting", key="t.limited")] == 0
