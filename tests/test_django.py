"""A Django project: ``@throttled_task`` found by ``autodiscover_tasks()`` and configured with
``CELERY_THROTTLE_*`` settings, run against a real worker (``demo_project/django_shop``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from .conftest import ROOT, wait_until

pytestmark = pytest.mark.timeout(180)
PROJECT = ROOT / "demo_project" / "django_shop"


def test_django_project_runs_its_throttled_tasks(
    redis_url: str, prefix: str, probe: redis.Redis, tmp_path: Path
):
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "SHOP_PREFIX": prefix,
        "SHOP_QUEUE": prefix,
        "DJANGO_SETTINGS_MODULE": "shop.settings",
        "PYTHONPATH": str(PROJECT),
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "shop",
                "worker",
                "-P",
                "threads",
                "-c",
                "6",
                "-n",
                f"shop-{prefix}@localhost",
                "-l",
                "info",
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=PROJECT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # Given the project's worker, which found the orders app's tasks by autodiscovery
        wait_until(
            lambda: "ready." in log.read_text() or worker.poll() is not None,
            60,
            what="the worker to be ready",
        )
        assert worker.poll() is None, log.read_text()
        assert "orders.tasks.reserve_stock" in log.read_text()
        # When Django code (here manage.py shell) sends eight reservations
        script = (
            "import json\n"
            "from orders.tasks import reserve_stock\n"
            "results = [reserve_stock.delay(f'sku-{i}', 0.2) for i in range(8)]\n"
            "print(json.dumps([r.get(timeout=60).to_json() for r in results]))\n"
        )
        shell = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", script],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shell.returncode == 0, shell.stderr
        envelopes = json.loads(shell.stdout.strip().splitlines()[-1])
        # Then each one settled as an ok envelope, at most two at once (the declared limit)
        assert [e["ok"] for e in envelopes] == [True] * 8, envelopes
        assert [e["value"]["sku"] for e in envelopes] == [f"sku-{i}" for i in range(8)]
        assert int(probe.get(f"{prefix}:probe:warehouse:peak") or 0) == 2
        # And CELERY_THROTTLE_KEY_PREFIX named the limiter's keys
        assert probe.hget(f"{prefix}:{{warehouse-api}}:m", "cap") == "2"
        assert probe.zscore(f"{prefix}:keys", "warehouse-api") is not None
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
