"""Scale: a big backlog behind one cap, and many keys at once.

    python benchmarks/bench_scale.py [--quick]

One worker of ``benchmarks/bench_app.py`` (prefork, concurrency 8); broker and results on one
Redis, the limiter on a second, private Redis whose command counter is read before and after:

* S1  10 000 tasks of 5 ms queued at once behind ``limit=5``;
* S2  10 000 tasks of 5 ms spread over 1 000 keys (``limit=1`` each), beside the same work as
      plain ``@shared_task`` in the same run.

Per row: the worker's resident memory (main process and pool, from /proc) idle after a warm-up
and at its highest during the row; commands per task the limiter's Redis received from clients
(acquires, releases, renewals, registry, subscriptions: counted with MONITOR, which tells them
from the commands the Lua scripts run, reported apart), until the worker's own releases, which
ride in its renewal round, have all reached the limiter; the limiter Redis's memory afterwards;
makespan against the ideal, and peak concurrency counted inside the tasks (S1).
Prints a table and writes ``benchmarks/results/bench_scale.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_cap import (  # noqa: E402
    CONCURRENCY,
    Bench,
    Line,
    Row,
    child_pids,
    environment,
    redis_for_bench,
    table,
    write_json,
)
from benchmarks.harness import add_keep_logs, worker_logs  # noqa: E402
from benchmarks.sampling import MonitorReader, Periodic  # noqa: E402
from celery_throttled.testing.redis import RedisServer  # noqa: E402
from celery_throttled.transport.scripts import Scripts  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_scale.json"
WORK = 0.005
RSS_TARGET_MB = 50.0
COMMANDS_TARGET = 3.0
#: the lease scripts by SHA, to tell acquires, releases and renewals apart
SCRIPTS = {Scripts.get(f"{n}.lua").sha: n for n in ("acquire", "release", "renew")}
#: the longest wait for the worker's last releases: its renewal round, lease TTL (30 s) / 3, and
#: a margin
SETTLE_S = 15.0


def rss_mb(pid: int) -> float:
    """Resident memory of a worker: its main process and every pool process, in MB."""
    total = 0
    for p in [pid, *child_pids(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class Sampler(Periodic):
    """The highest worker RSS seen while a row runs."""

    interval = 0.25

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.highest = 0.0

    def sample(self) -> None:
        self.highest = max(self.highest, rss_mb(self.pid))


class CommandCounter(MonitorReader):
    """Commands the limiter's Redis received from clients, by name, read from MONITOR.

    Redis's own counters also count every command a Lua script runs; MONITOR marks those
    ``[0 lua]``, so the two are told apart here.
    """

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.clients: Counter[str] = Counter()
        #: the EVALSHA calls, by the lease script called
        self.scripts: Counter[str] = Counter()
        self.in_scripts = 0
        #: the bench's own connection, for :meth:`settle`; its commands are not counted
        self._probe = redis.Redis.from_url(url, single_connection_client=True)
        self._probe_addr = f" {self._probe.client_info()['addr']}]".encode()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._probe.close()

    def line(self, line: bytes) -> None:
        if b" lua] " in line:
            self.in_scripts += 1
        elif self._probe_addr not in line:
            parts = line.split(b'"', 4)
            name = parts[1].decode().upper()
            self.clients[name] += 1
            if name == "EVALSHA" and len(parts) > 3:
                self.scripts[SCRIPTS.get(parts[3].decode(), "other")] += 1

    def settle(self, timeout: float = SETTLE_S) -> None:
        """Wait until the worker's own release of every run reached the limiter: those releases
        ride in its renewal round (every lease TTL / 3), and each removes its holder's ended
        mark (``{prefix}:{<key>}:e``); what they cost belongs to the row."""
        deadline = time.monotonic() + timeout
        while next(self._probe.scan_iter(match="*:e", count=1000), None) is not None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)


def measured(
    row: Row, limiter_url: str, jobs: list[tuple[str, list[Any]]], idle: float
) -> dict[str, Any]:
    with Sampler(row.workers[0].proc.pid) as sampler, CommandCounter(limiter_url) as counted:
        _, done = row.run(jobs, timeout=600)
        counted.settle()
    sent = sum(counted.clients.values())
    return {
        "tasks": len(jobs),
        "makespan_s": done.makespan(),
        "rss_idle_mb": idle,
        "rss_highest_mb": sampler.highest,
        "rss_growth_mb": sampler.highest - idle,
        "limiter_commands": sent,
        "limiter_commands_by_name": dict(counted.clients.most_common()),
        "limiter_scripts_by_name": dict(counted.scripts.most_common()),
        "commands_per_task": sent / len(jobs),
        "commands_in_scripts_per_task": counted.in_scripts / len(jobs),
        "limiter_memory_mb": int(redis.Redis.from_url(limiter_url).info("memory")["used_memory"])
        / 2**20,
    }


def idle_rss(row: Row) -> float:
    time.sleep(2.0)  # let the warm-up's garbage go before reading the idle figure
    return rss_mb(row.workers[0].proc.pid)


def s1_backlog(bench: Bench, limiter_url: str, n: int) -> dict[str, Any]:
    with bench.row("S1", env={"LIMITER_URL": limiter_url}) as row:
        row.warm_up("bench.scale_capped", [WORK])
        idle = idle_rss(row)
        result = measured(row, limiter_url, [("bench.scale_capped", [WORK])] * n, idle)
        result["peak"] = row.peak("scale")
        result["ideal_s"] = n * WORK / 5
    return result


def s2_many_keys(bench: Bench, limiter_url: str, n: int, keys: int) -> dict[str, Any]:
    with bench.row("S2", env={"LIMITER_URL": limiter_url}) as row:
        row.warm_up("bench.scale_tenant", [0, WORK])
        row.warm_up("bench.work_plain", [WORK])
        idle = idle_rss(row)
        plain = measured(row, limiter_url, [("bench.work_plain", [WORK])] * n, idle)
        jobs = [("bench.scale_tenant", [i % keys, WORK]) for i in range(n)]
        result = measured(row, limiter_url, jobs, idle)
        result["keys"] = keys
        result["plain_makespan_s"] = plain["makespan_s"]
        result["ideal_s"] = n * WORK / CONCURRENCY
    return result


def lines(s1: dict[str, Any], s2: dict[str, Any]) -> list[Line]:
    out = []
    for tag, r, what in (
        ("S1", s1, f"{s1['tasks']} x 5 ms behind limit=5"),
        ("S2", s2, f"{s2['tasks']} x 5 ms over {s2.get('keys')} keys"),
    ):
        growth = r["rss_growth_mb"]
        per_task = r["commands_per_task"]
        scripts = ", ".join(f"{n} {c}" for n, c in r.get("limiter_scripts_by_name", {}).items())
        out += [
            Line(
                tag,
                f"{what}: worker RSS idle -> highest (main + 8 pool processes)",
                f"{r['rss_idle_mb']:.0f} -> {r['rss_highest_mb']:.0f} MB",
            ),
            Line(
                tag,
                f"{what}: worker RSS growth over idle",
                f"{growth:.1f} MB",
                f"< {RSS_TARGET_MB:.0f} MB",
                growth < RSS_TARGET_MB,
            ),
            Line(
                tag,
                f"{what}: limiter Redis commands per task, sent by clients",
                f"{per_task:.2f} ({_top(r['limiter_commands_by_name'])}; EVALSHA: {scripts})",
                f"<= {COMMANDS_TARGET:.0f}",
                per_task <= COMMANDS_TARGET,
            ),
            Line(
                tag,
                f"{what}: commands run inside the Lua scripts, per task",
                f"{r['commands_in_scripts_per_task']:.1f}",
            ),
            Line(
                tag, f"{what}: limiter Redis memory afterwards", f"{r['limiter_memory_mb']:.1f} MB"
            ),
        ]
    out += [
        Line(
            "S1",
            "makespan / ideal",
            f"{s1['makespan_s'] / s1['ideal_s']:.3f} "
            f"({s1['makespan_s']:.1f} s for {s1['ideal_s']:.1f} s)",
        ),
        Line("S1", "peak concurrency", str(s1["peak"]), "<= 5", s1["peak"] <= 5, s1["peak"] > 5),
        Line(
            "S2",
            f"makespan, throttled over {s2.get('keys')} keys / plain",
            f"{s2['makespan_s'] / s2['plain_makespan_s']:.3f} "
            f"({s2['makespan_s']:.1f} / {s2['plain_makespan_s']:.1f} s)",
        ),
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 000 tasks, 200 keys")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--loglevel", default="warning")
    add_keep_logs(parser)
    args = parser.parse_args(argv)
    with worker_logs("bench-scale", keep=args.keep_logs) as logs:
        return logs.outcome(run(args, logs.path))


def run(args: argparse.Namespace, logdir: Path) -> int:
    n, keys = (2000, 200) if args.quick else (10_000, 1000)
    limiter = RedisServer().start(timeout=15)
    limiter_url = limiter.url
    try:
        with redis_for_bench() as url:
            bench = Bench(url, logdir, args.loglevel)
            env = environment(url)
            try:
                s1 = s1_backlog(bench, limiter_url, n)
                s2 = s2_many_keys(bench, limiter_url, n, keys)
            finally:
                bench.close()
    finally:
        limiter.stop()
    report = lines(s1, s2)
    print(table(report))
    write_json(
        args.out,
        {
            "environment": env,
            "quick": args.quick,
            "S1": s1,
            "S2": s2,
            "table": [line.__dict__ for line in report],
        },
    )
    print(f"results written to {args.out}")
    return 1 if s1["peak"] > 5 else 0


def _top(by_name: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in list(by_name.items())[:4])


if __name__ == "__main__":
    sys.exit(main())
