"""The soak run, in its two-minute form: mixed load on two workers, pool processes killed at
random and the limiter's Redis restarted half-way (``benchmarks/soak.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.timeout(420)


def test_two_minute_soak_loses_nothing_and_keeps_every_cap(tmp_path: Path, redis_url: str):
    summary_path = tmp_path / "soak.json"
    # A failed run keeps its logs in its temp directory: this test's, not the machine's
    env = {**os.environ, "REDIS_URL": redis_url, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--minutes", "2", "--json", str(summary_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert summary_path.exists(), done.stdout + done.stderr
    summary = json.loads(summary_path.read_text())
    # The chaos happened: pool processes killed, the limiter's Redis restarted, under load
    assert summary["submitted"] >= 1000, summary
    assert sum("killed pool process" in e for e in summary["events"]) >= 8
    assert any("restarted the limiter's Redis" in e for e in summary["events"])
    # Every task has its one outcome; killed ones as worker_lost, none run twice
    assert summary["missing_outcome"] == 0, summary
    assert summary["bodies_run_twice"] == [] and summary["runs_without_a_submission"] == []
    assert summary["failure_kinds"].get("error", 0) + summary["failure_kinds"].get(
        "worker_lost", 0
    ) == summary["statuses"].get("FAILURE", 0)
    # No lease or waiter left, and no cap ever exceeded
    assert summary["leases_left"] == {}
    assert summary["over_cap"] == {}, summary["peaks"]
    assert summary["ok"] is True
    assert done.returncode == 0, done.stdout + done.stderr
