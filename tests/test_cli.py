"""``celery throttle …`` and ``celery_throttled.status``: see and change caps on a live cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner

from celery_throttled.cli import throttle
from celery_throttled.status import KeyStatus, UnknownKey, inspect

from .conftest import ROOT, Workers, free_port, wait_until
from .probes import finished, peak, started

pytestmark = pytest.mark.timeout(180)


def limiter_app(redis_url: str, prefix: str) -> Celery:
    app = Celery("cli", broker=redis_url, set_as_current=False)
    app.conf.throttle_key_prefix = prefix
    return app


def status_of(app: Celery, key: str) -> KeyStatus | None:
    """The key's status, or None while no task of it has reached a worker yet (polled right
    after sending, the key may not be known)."""
    try:
        return inspect(app, [key])[0]
    except UnknownKey:
        return None


def run(app: Celery, *args: str):
    return CliRunner().invoke(throttle, list(args), obj=CLIContext(app, True, None))


def test_status_set_reset_and_clear_errors(workers: Workers, client, probe, prefix, redis_url):
    app = limiter_app(redis_url, prefix)
    # Before any task ran there is nothing to show, and unknown keys are refused in one line
    assert run(app, "status").output.strip() == "no throttled key is in use"
    unknown = run(app, "set", "nope", "3")
    assert unknown.exit_code == 1
    assert unknown.output.strip() == "Error: unknown key 'nope': no throttled task has used it"
    bad = run(app, "set", "t.limited", "0")
    assert bad.exit_code == 2 and "0 is not in the range x>=1" in bad.output
    # Given a worker running 2 capped tasks with 3 waiting
    workers.start(pool="prefork", concurrency=6)
    results = [client.send_task("t.limited", (f"x{i}", 1.0)) for i in range(5)]
    wait_until(
        lambda: (s := status_of(app, "t.limited")) and s.running == 2 and s.waiting == 3,
        30,
        what="2 running and 3 waiting",
    )
    # Then status shows it, in text and in JSON
    text = run(app, "status").output
    assert "t.limited" in text and "decorator" in text and "3 waiting on" in text
    (doc,) = json.loads(run(app, "status", "--json", "t.limited").output)
    assert (doc["cap"], doc["cap_source"], doc["running"], doc["waiting"]) == (2, "decorator", 2, 3)
    assert len(doc["holders"]) == 2 and all(h["task_id"] for h in doc["holders"])
    # When the cap is raised, the waiters start at once; reset brings the declared cap back
    out = run(app, "set", "t.limited", "5")
    assert out.exit_code == 0 and "cap 5 (override; declared 2)" in out.output
    wait_until(lambda: inspect(app, ["t.limited"])[0].running == 5, 5, what="5 running")
    assert run(app, "reset", "t.limited").output.startswith("t.limited: cap 2 (decorator)")
    for r in results:
        r.get(timeout=30)
    s = wait_until(
        lambda: (s := inspect(app, ["t.limited"])[0]).running == 0 and s,
        10,
        what="the last release (asynchronous) to land",
    )
    assert (s.done, s.failed, s.running, s.waiting) == (5, 0, 0, 0)
    assert s.wait_p50 is not None and s.wait_p99 is not None and s.wait_p99 >= s.wait_p50


def test_unreachable_redis_is_one_clear_line():
    app = Celery("cli", broker=f"redis://127.0.0.1:{free_port()}/0", set_as_current=False)
    out = run(app, "status")
    assert out.exit_code == 1
    assert out.output.startswith("Error: the limiter's Redis is unreachable:")
    assert len(out.output.strip().splitlines()) == 1


def test_set_changes_concurrency_on_running_workers(
    workers: Workers, client, probe, prefix, redis_url
):
    app = limiter_app(redis_url, prefix)
    workers.start(pool="threads", concurrency=4)
    workers.start(pool="prefork", concurrency=4)
    results = [client.send_task("t.limited", (f"x{i}", 1.5)) for i in range(14)]
    wait_until(lambda: len(started(probe, prefix, "limited")) == 2, 30, what="2 to start")
    # When the cap goes from 2 to 4 while two tasks run
    raised_at = time.time()
    assert run(app, "set", "t.limited", "4").exit_code == 0
    # Then two more start across the workers before either running task finishes
    wait_until(lambda: len(started(probe, prefix, "limited")) >= 4, 10, what="4 to start")
    starts = sorted(stamp for _, stamp in started(probe, prefix, "limited"))
    first_finish = min([s for _, s in finished(probe, prefix, "limited")], default=float("inf"))
    assert starts[3] < first_finish
    print(f"\nset took effect in {(starts[3] - raised_at) * 1000:.0f} ms (measured in the tasks)")
    # When it goes back to 2, no new task starts until fewer than 2 run
    lowered_at = time.time()
    assert run(app, "reset", "t.limited").exit_code == 0
    for r in results:
        r.get(timeout=60)
    spans = {
        label: (s, dict(finished(probe, prefix, "limited"))[label])
        for label, s in started(probe, prefix, "limited")
    }
    for label, (start, _) in spans.items():
        if start > lowered_at + 0.05:
            overlapping = [o for o, (s, f) in spans.items() if o != label and s < start < f]
            assert len(overlapping) < 2, (label, overlapping)
    assert peak(probe, prefix, "limited") == 4


def test_the_celery_command_itself(workers: Workers, client, prefix, redis_url):
    workers.start(pool="threads", concurrency=2)
    assert client.send_task("t.limited", ("x", 0)).get(timeout=30) == "x"
    env = {**os.environ, "REDIS_URL": redis_url, "TEST_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.apps.throttle_app",
            "throttle",
            "status",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    keys = {doc["key"]: doc for doc in json.loads(out.stdout)}
    assert keys["t.limited"]["done"] == 1 and keys["t.limited"]["cap"] == 2


def test_top_renders_a_frame_sorted_by_pressure(workers: Workers, client, probe, prefix, redis_url):
    app = limiter_app(redis_url, prefix)
    workers.start(pool="threads", concurrency=6)
    results = [client.send_task("t.limited", (f"x{i}", 1.0)) for i in range(5)]
    results.append(client.send_task("t.shared_a", ("a", 0.0)))
    wait_until(lambda: (s := status_of(app, "t.limited")) and s.waiting == 3, 30, what="3 waiting")
    out = run(app, "top", "--once")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    limited = next(i for i, line in enumerate(lines) if "t.limited" in line)
    shared = next(i for i, line in enumerate(lines) if "shared-downstream" in line)
    assert limited < shared  # 5 against a cap of 2 comes before an idle key
    assert "█" in lines[limited] and "▒" in lines[limited]
    for r in results:
        r.get(timeout=30)
