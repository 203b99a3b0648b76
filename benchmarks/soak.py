"""Soak: mixed load on two workers, with pool processes killed at random and one limiter restart.

    python benchmarks/soak.py [--minutes 30] [--rate 25] [--json PATH] [--logs DIR] [--keep-logs]

Two workers of ``benchmarks/bench_app.py`` (prefork, concurrency 4, lease TTL 6 s) take a steady
mix of tasks for ``--minutes``: capped at 3 on one key (some of them failing on purpose), capped
at 1 per tenant over four tenants, and uncapped. The broker and result backend are one Redis
(``REDIS_URL``, else a private one); the limiter is a second, private Redis. Meanwhile:

* every ``--kill-every`` seconds (default 10) one pool process of a random worker is SIGKILLed,
  taking whatever it runs with it;
* half-way through the limiter's Redis is restarted, losing every lease and waiting line.

Afterwards every submitted task must have exactly one outcome (a stored result in a final state,
and a body that ran at most once), no lease or waiter may be left in the limiter's Redis, and no
key's peak concurrency may have exceeded its cap. The peak comes from the spans the bodies log
(a killed body ends at its kill), not from a counter, which a killed process would leave high.
Prints a summary, writes it as JSON, and exits 0 only when all of that holds. The logs go to
``--logs`` when given, else to a temporary folder that is removed unless the run failed or
``--keep-logs`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from celery import Celery, states

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_cap import child_pids, redis_for_bench  # noqa: E402
from benchmarks.harness import add_keep_logs, worker_logs  # noqa: E402
from celery_throttled.testing.redis import RedisServer  # noqa: E402
from celery_throttled.testing.workers import wait_until  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "soak.json"
CAPS = {"soak": 3, **{f"tenant-{t}": 1 for t in range(4)}}
LEASE_TTL = 6.0


class LimiterRedis:
    """The limiter's private Redis, which the soak restarts on the same port."""

    def __init__(self, logdir: Path) -> None:
        self.server = RedisServer(log=logdir / "limiter-redis.log")
        self.url = self.server.url

    def start(self) -> None:
        self.server.start(timeout=15)

    def stop(self) -> None:
        proc = self.server.proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # no shutdown save: every lease and waiting line is lost
            proc.wait()

    def restart(self) -> None:
        self.stop()
        time.sleep(1.0)  # the workers see it gone: the outage path, not a blip
        self.start()


def start_worker(
    name: str, prefix: str, broker: str, limiter: str, logdir: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REDIS_URL": broker,
        "LIMITER_URL": limiter,
        "BENCH_PREFIX": prefix,
        "LEASE_TTL": str(LEASE_TTL),
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    }
    with (logdir / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "benchmarks.bench_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                "4",
                "-n",
                f"{name}-{prefix}@localhost",
                "-l",
                "warning",
                "-Q",
                prefix,
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_worker(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode


def job(rng: random.Random, n: int) -> tuple[str, list[Any]]:
    label = f"j{n}"
    draw = rng.random()
    duration = rng.uniform(0.02, 0.3)
    if draw < 0.35:
        return "bench.soak_capped", [label, duration]
    if draw < 0.45:
        return "bench.soak_failing", [label, duration]
    if draw < 0.8:
        return "bench.soak_tenant", [rng.randrange(4), label, duration]
    return "bench.soak_free", [label, duration]


def log_tails(logdir: Path, lines: int = 30) -> dict[str, str]:
    """The last lines of every log in ``logdir``, for the summary of a failed run."""
    return {
        path.name: "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        for path in sorted(logdir.glob("*.log"))
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The soak, its logs in ``--logs`` (kept), else in a temporary folder kept only when the
    run fails or ``--keep-logs`` is given."""
    with worker_logs("soak", keep=args.keep_logs, into=args.logs) as logs:
        summary = soak(args, logs.path)
        if not summary["ok"]:
            summary["log_tails"] = log_tails(logs.path)
        logs.outcome(0 if summary["ok"] else 1)
        summary["logs"] = str(logs.path) if logs.keep or logs.failed else None
    return summary


def soak(args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    prefix = f"soak{uuid.uuid4().hex[:6]}"
    rng = random.Random(args.seed)
    events: list[str] = []
    kills: list[tuple[int, float]] = []
    with redis_for_bench() as broker:
        limiter = LimiterRedis(logdir)
        limiter.start()
        probe = redis.Redis.from_url(broker, decode_responses=True)
        client = Celery("soak-client", broker=broker, set_as_current=False)
        client.conf.update(
            task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True
        )
        workers = {
            name: start_worker(name, prefix, broker, limiter.url, logdir)
            for name in ("soak1", "soak2")
        }
        submitted: dict[str, tuple[str, list[Any]]] = {}
        try:
            wait_until(lambda: len(client.control.ping(timeout=0.5)) >= 2, 90, what="both workers")
            began = time.monotonic()
            end = began + args.minutes * 60
            next_kill = began + args.kill_every
            restart_at = began + (end - began) / 2
            restarted = False
            n = 0
            with client.producer_or_acquire() as producer:
                while time.monotonic() < end:
                    name, task_args = job(rng, n)
                    n += 1
                    result = client.send_task(name, args=task_args, queue=prefix, producer=producer)
                    submitted[result.id] = (name, task_args)
                    now = time.monotonic()
                    if now >= next_kill:
                        next_kill = now + args.kill_every
                        worker = rng.choice(list(workers.values()))
                        children = child_pids(worker.pid)
                        if children:
                            victim = rng.choice(children)
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(victim, signal.SIGKILL)
                            kills.append((victim, time.time()))
                            events.append(f"{now - began:7.1f}s killed pool process {victim}")
                    if not restarted and now >= restart_at:
                        restarted = True
                        threading.Thread(target=limiter.restart, daemon=True).start()
                        events.append(f"{now - began:7.1f}s restarted the limiter's Redis")
                    time.sleep(max(0.0, 1.0 / args.rate - 0.0005))
            produced_for = time.monotonic() - began
            events.append(f"{produced_for:7.1f}s stopped submitting ({len(submitted)} tasks)")
            outcomes = wait_for_outcomes(probe, list(submitted), timeout=180)
            leases = wait_for_empty_lines(limiter.url, prefix, timeout=LEASE_TTL * 3 + 10)
        finally:
            exits = {name: stop_worker(proc) for name, proc in workers.items()}
            limiter.stop()
            client.close()
        runs = {k: int(v) for k, v in probe.hgetall(f"{prefix}:probe:soak:runs").items()}
        peaks = {key: peak(probe, prefix, key, kills) for key in CAPS}
    statuses = Counter(meta.get("status", "MISSING") for meta in outcomes.values())
    kinds = Counter(
        (meta.get("envelope") or {}).get("error", {}).get("kind", "?")
        for meta in outcomes.values()
        if meta.get("status") == states.FAILURE
    )
    missing = [task_id for task_id in submitted if task_id not in outcomes]
    labels = {
        args_[1] if name == "bench.soak_tenant" else args_[0] for name, args_ in submitted.values()
    }
    twice = sorted(label for label, count in runs.items() if count > 1)
    strangers = sorted(set(runs) - labels)
    over = {key: (peaks[key], cap) for key, cap in CAPS.items() if peaks[key] > cap}
    failing = sum(1 for name, _ in submitted.values() if name == "bench.soak_failing")
    summary = {
        "minutes": args.minutes,
        "rate": args.rate,
        "seed": args.seed,
        "prefix": prefix,
        "submitted": len(submitted),
        "statuses": dict(statuses),
        "failure_kinds": dict(kinds),
        "failing_on_purpose": failing,
        "missing_outcome": len(missing),
        "missing_sample": missing[:5],
        "bodies_run_twice": twice[:20],
        "runs_without_a_submission": strangers[:20],
        "peaks": peaks,
        "caps": CAPS,
        "over_cap": over,
        "leases_left": leases,
        "events": events,
        "worker_exits": exits,
    }
    summary["ok"] = not (missing or twice or strangers or over or any(leases.values()))
    return summary


def peak(probe: redis.Redis, prefix: str, group: str, kills: list[tuple[int, float]]) -> int:
    """The most bodies of ``group`` that ever ran at once, from their logged spans; a body
    whose process was killed ends at the kill."""

    def events(what: str) -> list[list[str]]:
        return [str(item).split() for item in probe.lrange(f"{prefix}:probe:{group}:{what}", 0, -1)]

    ends = {label: float(at) for label, at in events("ends")}
    edges: list[tuple[float, int]] = []
    for label, pid, at in events("starts"):
        start = float(at)
        end = ends.get(label)
        if end is None:  # no end logged: its process died; else it never ended (inf)
            end = min((t for p, t in kills if p == int(pid) and t >= start), default=1e18)
        edges += [(start, 1), (end, -1)]
    running = highest = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):  # an end before a start at a tie
        running += step
        highest = max(highest, running)
    return highest


def wait_for_outcomes(
    probe: redis.Redis, ids: list[str], timeout: float
) -> dict[str, dict[str, Any]]:
    """The stored result of every id that reaches a final state within ``timeout``."""
    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(ids) and time.monotonic() < deadline:
        pending = [i for i in ids if i not in done]
        for start in range(0, len(pending), 1000):
            chunk = pending[start : start + 1000]
            for task_id, raw in zip(
                chunk, probe.mget([f"celery-task-meta-{i}" for i in chunk]), strict=True
            ):
                if raw:
                    meta = json.loads(raw)
                    if meta.get("status") in states.READY_STATES:
                        done[task_id] = meta
        if len(done) < len(ids):
            time.sleep(0.5)
    return done


def wait_for_empty_lines(limiter_url: str, prefix: str, timeout: float) -> dict[str, int]:
    """Holders and waiters left in the limiter's Redis, once they had time to go."""
    client = redis.Redis.from_url(limiter_url)

    def left() -> dict[str, int]:
        counts: dict[str, int] = {}
        for pattern in (f"{prefix}:*:h", f"{prefix}:*:w"):
            for key in client.scan_iter(match=pattern, count=1000):
                counts[key.decode()] = int(client.zcard(key))
        return {k: v for k, v in counts.items() if v}

    deadline = time.monotonic() + timeout
    while True:
        remaining = left()
        if not remaining or time.monotonic() > deadline:
            return remaining
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=25.0, help="tasks submitted per second")
    parser.add_argument(
        "--kill-every", type=float, default=10.0, help="seconds between pool process kills"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the summary")
    parser.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="keep the logs here (default: a temporary folder, removed at the end)",
    )
    add_keep_logs(parser)
    args = parser.parse_args(argv)
    summary = run(args)
    print(f"soak of {args.minutes:g} min at {args.rate:g} tasks/s: {summary['submitted']} tasks")
    for line in summary["events"]:
        print(f"  {line}")
    print(
        f"  outcomes: {summary['statuses']}; failures by kind: {summary['failure_kinds']} "
        f"({summary['failing_on_purpose']} failing on purpose)"
    )
    print(
        f"  without an outcome: {summary['missing_outcome']}; bodies run twice: "
        f"{len(summary['bodies_run_twice'])}; leases or waiters left: "
        f"{sum(summary['leases_left'].values())}"
    )
    print("  peak / cap: " + ", ".join(f"{k} {summary['peaks'][k]}/{c}" for k, c in CAPS.items()))
    for name, tail in summary.get("log_tails", {}).items():
        print(f"----- the end of {name} -----\n{tail}")
    kept = f"; logs in {summary['logs']}" if summary["logs"] else ""
    print(f"  {'OK' if summary['ok'] else 'FAILED'}{kept}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
