"""Smoke test of an installed celery-throttled, run by the interpreter of a fresh virtualenv.

    python wheel_smoke.py --checkout DIR --redis-server PATH

Run from a directory outside the checkout (``noxfile.py``'s ``smoke`` session does so): it
checks that the package is imported from the virtualenv, never from ``DIR``, that every Lua
script and ``py.typed`` of ``DIR/plugin`` were installed, then starts a private redis-server and
a real ``celery worker`` (through the installed ``celery`` script) of a tiny app with a throttled
task, runs tasks through the cap, asks the worker where it loaded the package and its scripts
from, and reads ``celery throttle status --json``. Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import redis

from celery_throttled.testing.redis import RedisServer
from celery_throttled.testing.workers import wait_answering, wait_until

APP = """
import os
import time
from importlib import resources

import redis
from celery import Celery

import celery_throttled
from celery_throttled import throttled_task

URL = os.environ["SMOKE_REDIS_URL"]
app = Celery("smoke_app", broker=URL, backend=URL)
app.conf.update(task_default_queue="smoke", broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False, throttle_key_prefix="smoke")
probe = redis.Redis.from_url(URL)


@throttled_task(limit=2, name="smoke.capped")
def capped(seconds: float) -> int:
    now = probe.incr("probe:now")
    if now > int(probe.get("probe:peak") or 0):
        probe.set("probe:peak", now)
    try:
        time.sleep(seconds)
    finally:
        probe.decr("probe:now")
    return now


@throttled_task(limit=1, name="smoke.where")
def where() -> dict[str, str]:
    return {"package": celery_throttled.__file__,
            "lua": str(resources.files("celery_throttled").joinpath("lua"))}
"""


def check(condition: object, message: str) -> None:
    if not condition:
        raise SystemExit(f"wheel smoke test FAILED: {message}")
    print(f"ok: {message}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def check_installed(checkout: Path) -> None:
    import celery_throttled

    installed = Path(celery_throttled.__file__).resolve().parent
    check(
        installed.is_relative_to(Path(sys.prefix).resolve()),
        f"celery_throttled is imported from the virtualenv ({installed})",
    )
    check(
        not any(Path(p or ".").resolve().is_relative_to(checkout) for p in sys.path),
        "no entry of sys.path is inside the checkout",
    )
    source = checkout / "plugin" / "celery_throttled"
    wanted = sorted(str(p.relative_to(source)) for p in source.rglob("*.lua"))
    present = sorted(str(p.relative_to(installed)) for p in installed.rglob("*.lua"))
    check(wanted and present == wanted, f"the {len(wanted)} Lua scripts are installed")
    check((installed / "py.typed").is_file(), "py.typed is installed")
    lua = resources.files("celery_throttled").joinpath("lua").joinpath("acquire.lua").read_text()
    check("KEYS[1]" in lua, "the scripts read through importlib.resources")


def run_app(workdir: Path, redis_url: str, bin_dir: Path) -> None:
    (workdir / "smoke_app.py").write_text(APP)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(SMOKE_REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    log = workdir / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [
                str(bin_dir / "celery"),
                "-A",
                "smoke_app",
                "worker",
                "-P",
                "threads",
                "-c",
                "4",
                "-n",
                "smoke@localhost",
                "-Q",
                "smoke",
                "-l",
                "info",
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        sys.path.insert(0, str(workdir))
        os.environ["SMOKE_REDIS_URL"] = redis_url
        from smoke_app import app  # type: ignore[import-not-found]

        wait_answering(app, "smoke@localhost", worker, log, 60)
        check(True, "a celery worker of the installed package answers")
        results = [app.tasks["smoke.capped"].delay(0.3) for _ in range(6)]
        envelopes = [r.get(timeout=60) for r in results]
        check(all(e.ok for e in envelopes), "six throttled tasks returned ok envelopes")
        peak = int(redis.Redis.from_url(redis_url).get("probe:peak") or 0)
        check(peak == 2, f"the cap of 2 held and was used in full (peak {peak})")
        where = app.tasks["smoke.where"].delay().get(timeout=60).unwrap()
        check(
            Path(where["package"]).resolve().is_relative_to(Path(sys.prefix).resolve()),
            f"the worker imported the package from the virtualenv ({where['package']})",
        )
        check(
            Path(where["lua"]).resolve().is_relative_to(Path(sys.prefix).resolve()),
            f"the worker read its Lua scripts from the virtualenv ({where['lua']})",
        )

        def status() -> dict[str, Any] | None:
            """The key's row once its six runs were released (releases are asynchronous)."""
            out = subprocess.run(
                [str(bin_dir / "celery"), "-A", "smoke_app", "throttle", "status", "--json"],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            check(out.returncode == 0, f"celery throttle status exits 0 {out.stderr.strip()}")
            rows = {row["key"]: row for row in json.loads(out.stdout)}
            row: dict[str, Any] = rows.get("smoke.capped", {})
            return row if row.get("done") == 6 else None

        row = wait_until(status, 30, what="celery throttle status to count six runs done")
        check(
            row["cap"] == 2 and row["running"] == 0 and row["waiting"] == 0,
            f"celery throttle status --json reports the key: {row}",
        )
    except AssertionError as timed_out:  # wait_answering, wait_until
        print(f"----- worker log -----\n{log.read_text(errors='replace')[-5000:]}")
        raise SystemExit(f"wheel smoke test FAILED: {timed_out}") from None
    except SystemExit:
        print(f"----- worker log -----\n{log.read_text(errors='replace')[-5000:]}")
        raise
    finally:
        stop(worker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, required=True)
    parser.add_argument("--redis-server", required=True)
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    check(not Path.cwd().resolve().is_relative_to(checkout), f"running outside {checkout}")
    check_installed(checkout)
    try:
        server = RedisServer(binary=args.redis_server).start()
    except RuntimeError as failed:
        raise SystemExit(f"wheel smoke test FAILED: {failed}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="celery-throttled-smoke-") as workdir:
            run_app(Path(workdir), server.url, Path(sys.executable).parent)
    finally:
        server.stop()
    print("wheel smoke test passed")


if __name__ == "__main__":
    main()
