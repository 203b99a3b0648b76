"""The demo's tasks under the celery-throttled pytest plugin, the way an application tests its
own: real workers of ``demo`` on a private Redis, the probe for peaks, ``assert_envelope``."""

from __future__ import annotations

import pytest

from celery_throttled.testing import ConcurrencyProbe, WorkerFactory, assert_envelope
from demo.downstream import Server

pytestmark = pytest.mark.timeout(180)


def test_the_payments_cap_protects_the_downstream(
    throttle_worker: WorkerFactory, throttle_probe: ConcurrencyProbe, downstream: Server
) -> None:
    """Given two prefork workers of the demo with eight processes between them and a
    downstream that answers 503 to a sixth caller, when 30 charges are sent at once, then every
    charge succeeds, at most five ran at once and the downstream never turned one away."""
    from demo.tasks import charge

    env = {"DOWNSTREAM_URL": f"http://127.0.0.1:{downstream.server_port}"}
    throttle_worker("demo", pool="prefork", concurrency=4, env=env)
    throttle_worker("demo", pool="prefork", concurrency=4, env=env)
    results = [charge.delay(i, ms=40) for i in range(30)]
    for result in results:
        assert_envelope(result.get(timeout=60), ok=True, key="payments-api")
    assert throttle_probe.peak("payments-api") == 5
    assert downstream.downstream.stats()["violations"] == 0


def test_panics_and_timeouts_come_back_as_envelopes(throttle_worker: WorkerFactory) -> None:
    """Given one prefork worker of the demo, when a task raises SystemExit, one returns a set
    and one ignores its soft timeout, then each caller gets the envelope saying so and the
    worker keeps serving."""
    from demo.tasks import build_report, risky

    worker = throttle_worker("demo", pool="prefork", concurrency=2)
    assert_envelope(
        risky.delay("system_exit").get(timeout=60), kind="error", error_type="builtins.SystemExit"
    )
    assert_envelope(
        risky.delay("unserializable").get(timeout=60), kind="unserializable", message="set"
    )
    assert_envelope(
        build_report.delay("slow", 5, cleans_up=False).get(timeout=60), kind="hard_timeout"
    )
    assert_envelope(risky.delay("fine").get(timeout=60), ok=True, value="fine")
    assert worker.alive()
