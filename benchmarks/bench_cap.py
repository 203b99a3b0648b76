"""Benchmark the cap against plain Celery and the hand-written recipes, in one run.

    python benchmarks/bench_cap.py [--quick] [--scale K] [--rows P1,P2,P3,P4] [--rounds N]

Every row runs real ``celery worker`` subprocesses (prefork, concurrency 8, prefetch multiplier
1, json, Redis broker and result backend) of ``benchmarks/bench_app.py``, each row on its own
queue and ``throttle_key_prefix``, with its workers stopped before the next row starts:

* P1  no-op throughput: ``@throttled_task(limit=10000)`` (a cap that never binds) against
      ``@shared_task``, alternating plain/throttled twice, best of each; with the CPU each
      task cost the worker's main process, its pool and Redis (from /proc and INFO cpu).
* P2  200 x 50 ms at a cap of 5, against the recipes "counter + retry" and "counter + spin";
      the cap once more with ``throttle_park=True`` (waiters parked in idle pool processes);
      and the floor: the same plain tasks on a worker of concurrency 5, whose pool is the only
      cap (Celery's own hand-off from one body's end to the next body's dispatch, no Redis).
* P3  200 capped + 200 uncapped 50 ms tasks interleaved on one queue; the same with the spin
      recipe; and the floor: 400 plain tasks, the 8 pool processes the only limit.
* P4  hand-off latency under a cap of 1 between two workers on this machine (by default, then
      with ``throttle_park=True``), and (P5) its split: body end -> slot free (the pool
      process's release returned) -> waiter granted (its worker admitted it, or its parked pool
      process read "go") -> waiter running (its body started).

With ``--rounds N`` P2's and P3's variants run N times in turn (every variant once per round, so
a passing load on this shared machine touches each alike), and each is judged on its median; the
table lists every round's ratio.

Times run from the first submission to the last result's ``date_done`` (stamped by the worker
that stored it, so the client's polling does not count). Peak concurrency is counted inside the
tasks with a Redis counter; each body also logs its span, from which P2 and P3 report how long
a freed slot stayed empty ("slot refill") and the share of slot-time spent in bodies.

Redis: ``REDIS_URL`` when set, else a private redis-server on a free loopback port, stopped at
the end. Worker logs stay in a temporary directory (printed).

Prints a markdown table and writes every raw figure to ``benchmarks/results/bench_cap.json``.
Exit status: 0 even when a target is missed; 1 when any cap was exceeded (VIOLATION); 2 when a
row could not be completed (a worker did not start, tasks failed or timed out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path
from typing import Any

import celery
import kombu
import redis
from celery import Celery, states
from celery.backends.base import KeyValueStoreBackend

import celery_throttled
from celery_throttled.keys import Family
from celery_throttled.testing.redis import RedisServer
from celery_throttled.testing.workers import stop_workers, wait_answering, wait_until

ROOT = Path(__file__).resolve().parent.parent
APP = "benchmarks.bench_app"
RESULTS = ROOT / "benchmarks" / "results" / "bench_cap.json"
ROWS = ("P1", "P2", "P3", "P4")

CONCURRENCY = 8
# The caps declared in bench_app.py; checked against what the limiter recorded in Redis.
NEVER_BINDS = 10_000
WORK_CAP = 5
HANDOFF_CAP = 1
WORK = 0.05
HANDOFF_WORK = 0.02

NOOP_PLAIN, NOOP_THROTTLED = "bench.noop_plain", "bench.noop_throttled"
WORK_PLAIN, WORK_THROTTLED = "bench.work_plain", "bench.work_throttled"
RECIPE_RETRY, RECIPE_SPIN = "bench.recipe_retry", "bench.recipe_spin"
HANDOFF = "bench.handoff"

Job = tuple[str, list[Any]]


@dataclass(frozen=True)
class Sizes:
    noop: int
    work: int
    handoff: int

    @classmethod
    def of(cls, quick: bool, scale: float = 1.0) -> Sizes:
        base = cls(noop=300, work=60, handoff=40) if quick else cls(1000, 200, 100)
        return cls(int(base.noop * scale), int(base.work * scale), int(base.handoff * scale))


@dataclass
class Line:
    """One line of the table."""

    row: str
    measure: str
    value: str
    target: str = ""
    met: bool | None = None
    violation: bool = False

    def cells(self) -> list[str]:
        met = "" if self.met is None else ("yes" if self.met else "**no**")
        if self.violation:
            met = "**VIOLATION**"
        return [self.row, self.measure, self.value, self.target, met]


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    logs: dict[str, Any] = field(default_factory=dict)

    def add(self, *lines: Line) -> None:
        self.lines.extend(lines)

    def peak(self, row: str, what: str, peak: int, cap: int | None) -> None:
        """A peak-concurrency line; a peak above ``cap`` is a violation."""
        if cap is None:
            self.add(Line(row, f"peak concurrency, {what}", str(peak)))
            return
        ok = peak <= cap
        self.add(Line(row, f"peak concurrency, {what}", str(peak), f"<= {cap}", ok, not ok))
        if not ok:
            message = f"VIOLATION: {row} {what}: peak concurrency {peak} > cap {cap}"
            self.violations.append(message)
            print(message, flush=True)


# -- processes -------------------------------------------------------------------------------
@contextlib.contextmanager
def redis_for_bench() -> Iterator[str]:
    """``REDIS_URL`` if set, else a private redis-server on a free loopback port."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer().start(timeout=15)
    try:
        yield server.url
    finally:
        server.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads), from /proc; 0.0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


@dataclass
class Worker:
    node: str
    log: Path
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls,
        node: str,
        prefix: str,
        redis_url: str,
        log: Path,
        loglevel: str,
        extra_env: Mapping[str, str],
        concurrency: int = CONCURRENCY,
    ) -> Worker:
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "BENCH_PREFIX": prefix,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        }
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            APP,
            "worker",
            "-P",
            "prefork",
            "-c",
            str(concurrency),
            "-n",
            node,
            "-l",
            loglevel,
            "-Q",
            prefix,
            "--without-gossip",
            "--without-mingle",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return cls(node, log, proc)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, client: Celery, timeout: float = 60.0) -> None:
        wait_answering(client, self.node, self.proc, self.log, timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (warm shutdown), SIGKILL to the whole group after ``timeout``."""
        stop_workers([self.proc], timeout)
        with contextlib.suppress(ProcessLookupError):  # no pool child may outlive its worker
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the main process (with its threads) and of its pool."""
        pool = sum(cpu_seconds(child) for child in child_pids(self.proc.pid))
        return cpu_seconds(self.proc.pid), pool

    def problems(self) -> dict[str, Any]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = text.splitlines()
        first = next((i for i, line in enumerate(lines) if "Traceback" in line), None)
        return {
            "log": str(self.log),
            "tracebacks": text.count("Traceback"),
            "errors": sum(1 for line in lines if "ERROR" in line or "CRITICAL" in line),
            "warnings": sum(1 for line in lines if "WARNING" in line),
            "first_traceback": None if first is None else "\n".join(lines[first : first + 40]),
        }


# -- the bench -------------------------------------------------------------------------------
@dataclass
class Done:
    """When each task of a batch finished (its result's ``date_done``, epoch seconds)."""

    started: float
    finished: dict[str, float]
    statuses: Counter[str]
    missing: int
    #: what the missing ones' results said last: a state not ready (RETRY, say), or "none"
    left: Counter[str] = field(default_factory=Counter)

    @property
    def complete(self) -> bool:
        return self.missing == 0 and set(self.statuses) == {states.SUCCESS}

    def makespan(self, ids: Sequence[str] | None = None) -> float:
        ends = self.finished.values() if ids is None else [self.finished[i] for i in ids]
        return max(ends) - self.started


class Row:
    """One row's queue, key prefix and workers."""

    def __init__(self, bench: Bench, prefix: str, workers: list[Worker]) -> None:
        self.bench = bench
        self.prefix = prefix
        self.workers = workers

    def run(self, jobs: Sequence[Job], timeout: float) -> tuple[list[str], Done]:
        """Submit ``jobs`` in order, wait until every result is stored."""
        client = self.bench.client
        ids: list[str] = []
        with client.producer_or_acquire() as producer:
            started = time.time()
            for name, args in jobs:
                result = client.send_task(name, args=args, queue=self.prefix, producer=producer)
                ids.append(result.id)
        done = self.bench.wait(ids, started, timeout)
        if not done.complete:
            raise RuntimeError(
                f"{self.prefix}: of {len(ids)} tasks, {done.missing} had no result after "
                f"{timeout:.0f}s (their results said {dict(done.left)}) and the others ended "
                f"{dict(done.statuses)}"
            )
        return ids, done

    def warm_up(self, name: str, args: list[Any], n: int = 2 * CONCURRENCY) -> None:
        """Let every pool process open its connections and load the scripts before timing."""
        self.run([(name, args)] * n, timeout=60)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: the workers' main processes, their pools, and Redis."""
        usage = [worker.cpu() for worker in self.workers]
        info = self.bench.redis.info("cpu")
        return {
            "worker_main": sum(main for main, _ in usage),
            "worker_pool": sum(pool for _, pool in usage),
            "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        }

    def peak(self, group: str) -> int:
        return int(self.bench.redis.get(f"{self.prefix}:probe:{group}:peak") or 0)

    def spans(self, group: str) -> list[tuple[float, float]]:
        """(start, end) of every body of ``group`` since the last :meth:`forget`."""
        raw = self.bench.redis.lrange(f"{self.prefix}:probe:{group}:spans", 0, -1)
        return [(float(a), float(b)) for a, b in (item.split() for item in raw)]

    def forget(self, *groups: str) -> None:
        """Drop the spans logged so far (the warm-up's); peaks are kept for the whole row."""
        for group in groups:
            self.bench.redis.delete(f"{self.prefix}:probe:{group}:spans")

    def counter(self, key: str) -> int:
        return int(self.bench.redis.get(f"{self.prefix}:{key}") or 0)

    def limiter_state(self, key: str) -> dict[str, Any]:
        """What the limiter left in Redis for ``key`` once its leases had time to be released."""
        family = Family.of(self.prefix, key)
        r = self.bench.redis

        def settled() -> bool:
            return r.zcard(family.holders) == 0 and r.zcard(family.waiters) == 0

        with contextlib.suppress(AssertionError):
            wait_until(settled, 3.0, what="leases to be released")
        cap = r.hget(family.meta, "cap")
        return {
            "recorded_cap": None if cap is None else int(cap),
            "leases_left": int(r.zcard(family.holders)),
            "waiters_left": int(r.zcard(family.waiters)),
        }


class Bench:
    def __init__(self, redis_url: str, logdir: Path, loglevel: str, rounds: int = 1) -> None:
        self.redis_url = redis_url
        #: how many times P2 and P3 run each variant, in turn
        self.rounds = rounds
        self.logdir = logdir
        self.loglevel = loglevel
        self.run_id = uuid.uuid4().hex[:6]
        self.redis = redis.Redis.from_url(redis_url)
        # No result backend on the client: it would subscribe to every task's result channel.
        # Results are read straight from their keys (see wait()).
        self.client = Celery("bench-client", broker=redis_url, set_as_current=False)
        self.client.conf.update(
            task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True
        )
        self.result_prefix = KeyValueStoreBackend.task_keyprefix
        self.report = Report()

    def close(self) -> None:
        self.client.close()
        self.redis.close()

    @contextlib.contextmanager
    def row(
        self,
        tag: str,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        concurrency: int = CONCURRENCY,
    ) -> Iterator[Row]:
        """A row's workers (``env``: more environment for them), started and answering."""
        prefix = f"bench{self.run_id}{tag.lower()}"
        started = [
            Worker.start(
                f"{tag.lower()}w{i + 1}-{self.run_id}@localhost",
                prefix,
                self.redis_url,
                self.logdir / f"{tag}-w{i + 1}.log",
                self.loglevel,
                env or {},
                concurrency,
            )
            for i in range(workers)
        ]
        try:
            for worker in started:
                worker.wait_ready(self.client)
            yield Row(self, prefix, started)
        finally:
            for worker in started:
                code = worker.stop()
                self.report.logs[f"{tag}/{worker.node}"] = {"exit": code, **worker.problems()}
            if os.environ.get("REDIS_URL"):  # a shared Redis: leave no queue, probe or lease
                self.redis.delete(
                    prefix, f"_kombu.binding.{prefix}", f"_kombu.binding_permanent.{prefix}"
                )
                for key in self.redis.scan_iter(match=f"{prefix}:*", count=1000):
                    self.redis.delete(key)

    def wait(self, ids: Sequence[str], started: float, timeout: float) -> Done:
        pending = {f"{self.result_prefix}{task_id}": task_id for task_id in ids}
        finished: dict[str, float] = {}
        statuses: Counter[str] = Counter()
        last: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            keys = list(pending)
            for i in range(0, len(keys), 1000):
                chunk = keys[i : i + 1000]
                for key, value in zip(chunk, self.redis.mget(chunk), strict=True):
                    if value is None:
                        continue
                    meta = json.loads(value)
                    if meta["status"] not in states.READY_STATES:  # e.g. RETRY
                        last[key] = meta["status"]
                        continue
                    statuses[meta["status"]] += 1
                    finished[pending.pop(key)] = _epoch(meta["date_done"])
            if pending:
                time.sleep(0.1)
        if ids:
            self.redis.delete(*[f"{self.result_prefix}{task_id}" for task_id in ids])
        left = Counter(last.get(key, "none") for key in pending)
        return Done(started, finished, statuses, len(pending), left)


def _epoch(iso: str) -> float:
    moment = datetime.fromisoformat(iso)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile, interpolated between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def slot_profile(
    spans: Sequence[tuple[float, float]], cap: int, submitted: float
) -> dict[str, float]:
    """How well the bodies kept ``cap`` slots busy.

    ``refill``: from the k-th body end to the (k + cap)-th body start, i.e. how long a freed
    slot stayed empty while the backlog lasted.
    """
    starts = sorted(start for start, _ in spans)
    ends = sorted(end for _, end in spans)
    refill = [(starts[k + cap] - ends[k]) * 1000 for k in range(len(ends) - cap)]
    busy = sum(end - start for start, end in spans)
    return {
        "first_start_s": starts[0] - submitted,
        "last_end_s": ends[-1] - submitted,
        "body_mean_ms": busy / len(spans) * 1000,
        "occupancy": busy / (cap * (ends[-1] - starts[0])),
        "refill_p50_ms": percentile(refill, 50),
        "refill_p99_ms": percentile(refill, 99),
    }


def profile_line(row: str, label: str, profile: dict[str, float]) -> Line:
    return Line(
        row,
        f"{label}: slot refill p50 / p99; occupancy; first start",
        f"{profile['refill_p50_ms']:.1f} / {profile['refill_p99_ms']:.1f} ms; "
        f"{profile['occupancy']:.0%}; {profile['first_start_s'] * 1000:.0f} ms",
    )


def cap_check(report: Report, row: str, state: dict[str, Any], declared: int) -> None:
    recorded = state["recorded_cap"]
    if recorded is not None and recorded != declared:
        report.errors.append(f"{row}: the limiter recorded cap {recorded}, expected {declared}")
    if state["leases_left"] or state["waiters_left"]:
        report.notes.append(f"{row}: leases or waiters left in Redis after the row: {state}")


# -- the rows --------------------------------------------------------------------------------
def p1_noop(bench: Bench, sizes: Sizes) -> None:
    report, n = bench.report, sizes.noop
    timeout = max(120.0, n / 20)
    makespans: dict[str, list[float]] = {NOOP_PLAIN: [], NOOP_THROTTLED: []}
    cpu: dict[str, dict[str, list[float]]] = {NOOP_PLAIN: {}, NOOP_THROTTLED: {}}
    with bench.row("P1") as row:
        row.warm_up(NOOP_PLAIN, [False])
        row.warm_up(NOOP_THROTTLED, [False])
        for name in (NOOP_PLAIN, NOOP_THROTTLED, NOOP_PLAIN, NOOP_THROTTLED):
            before = row.cpu()
            _, done = row.run([(name, [False])] * n, timeout)
            after = row.cpu()
            makespans[name].append(done.makespan())
            for part, seconds in after.items():
                cpu[name].setdefault(part, []).append((seconds - before[part]) / n * 1e6)
        # The timed runs skip the probe (two Redis calls per task would dilute the ratio);
        # one more throttled batch counts its concurrency.
        row.run([(NOOP_THROTTLED, [True])] * max(n // 4, 4 * CONCURRENCY), timeout)
        peak = row.peak("noop_throttled")
        state = row.limiter_state(NOOP_THROTTLED)
    plain, throttled = min(makespans[NOOP_PLAIN]), min(makespans[NOOP_THROTTLED])
    ratio = plain / throttled
    overhead_us = (throttled - plain) / n * 1e6
    report.add(
        Line("P1", f"plain @shared_task, {n} no-ops (best of 2)", f"{n / plain:.0f} tasks/s"),
        Line(
            "P1",
            f"@throttled_task(limit={NEVER_BINDS}), same (best of 2)",
            f"{n / throttled:.0f} tasks/s",
        ),
        Line("P1", "throughput ratio throttled / plain", f"{ratio:.2f}", ">= 0.92", ratio >= 0.92),
        Line("P1", "overhead per task (makespan difference / N)", f"{overhead_us:.0f} µs"),
    )
    mean_cpu = {
        name: {part: sum(v) / len(v) for part, v in parts.items()} for name, parts in cpu.items()
    }
    for part, label in (
        ("worker_main", "worker main process (with its threads)"),
        ("worker_pool", "pool processes"),
        ("redis", "Redis server"),
    ):
        report.add(
            Line(
                "P1",
                f"CPU per task, {label}: plain / throttled",
                f"{mean_cpu[NOOP_PLAIN][part]:.0f} / {mean_cpu[NOOP_THROTTLED][part]:.0f} µs",
            )
        )
    report.peak("P1", f"throttled no-op (cap {NEVER_BINDS})", peak, NEVER_BINDS)
    cap_check(report, "P1", state, NEVER_BINDS)
    report.raw["P1"] = {
        "n": n,
        "makespans_s": makespans,
        "best_plain_s": plain,
        "best_throttled_s": throttled,
        "throughput_plain": n / plain,
        "throughput_throttled": n / throttled,
        "ratio": ratio,
        "overhead_us_per_task": overhead_us,
        "cpu_us_per_task": cpu,
        "cpu_us_per_task_mean": mean_cpu,
        "peak_throttled": peak,
        "limiter": state,
    }


def p2_capped_work(bench: Bench, sizes: Sizes) -> None:
    """P2's variants, ``bench.rounds`` times in turn (each round runs every variant once, so a
    passing load touches all of them alike); each is judged on the median of its rounds."""
    report, n = bench.report, sizes.work
    ideal = n * WORK / WORK_CAP
    timeout = max(120.0, 30 * ideal)
    raw: dict[str, Any] = {
        "n": n,
        "work_s": WORK,
        "cap": WORK_CAP,
        "ideal_s": ideal,
        "rounds": bench.rounds,
    }
    parked = f"@throttled_task(limit={WORK_CAP}), throttle_park=True"
    variants = (
        ("P2", WORK_THROTTLED, [WORK], "work_throttled", f"@throttled_task(limit={WORK_CAP})"),
        ("P2p", WORK_THROTTLED, [WORK], "work_throttled", parked),
        (
            "P2a",
            RECIPE_RETRY,
            [WORK, WORK_CAP],
            "recipe_retry",
            "recipe counter + retry(countdown=0.1)",
        ),
        ("P2b", RECIPE_SPIN, [WORK, WORK_CAP], "recipe_spin", "recipe counter + spin (10 ms)"),
        (
            "P2f",
            WORK_PLAIN,
            [WORK],
            "work_plain",
            f"floor: @shared_task on a worker of concurrency {WORK_CAP} (its pool the only cap)",
        ),
    )
    runs: dict[str, list[dict[str, Any]]] = {tag: [] for tag, *_ in variants}
    for _ in range(bench.rounds):
        for tag, name, args, group, _label in variants:
            runs[tag].append(_p2_once(bench, tag, name, args, group, n, ideal, timeout))
    cap_ratio: float | None = None
    for tag, name, _args, group, label in variants:
        done = runs[tag]
        ratios, ratio, middle = median_run(done)
        line = Line(
            "P2",
            f"{label}: {n} x 50 ms, makespan / ideal ({ideal:.1f} s)",
            rounds_value(ratios, middle["makespan_s"]),
        )
        if name == WORK_THROTTLED:
            line.target, line.met = "<= 1.05", ratio <= 1.05
            for run in done:
                cap_check(report, tag, run["limiter"], WORK_CAP)
            if tag == "P2":
                cap_ratio = ratio
        elif name != WORK_PLAIN and cap_ratio is not None:  # a recipe: the cap must beat it
            line.target, line.met = f"> {cap_ratio:.3f}", ratio > cap_ratio
        report.add(line, profile_line("P2", label, middle["slots"]))
        if name == RECIPE_RETRY:
            retries = sum(run["retries"] for run in done) / len(done)
            report.add(
                Line("P2", f"{label}: retries", f"{retries:.0f} ({retries / n:.1f} per task)")
            )
        peak = max(run["peak"] for run in done)
        report.peak("P2", label, peak, WORK_CAP)
        raw[group + ("_parked" if tag == "P2p" else "")] = {
            "ratio": ratio,
            "ratios": ratios,
            "makespan_s": middle["makespan_s"],
            "peak": peak,
            "retries": [run["retries"] for run in done],
            "slots": middle["slots"],
            "limiter": [run["limiter"] for run in done],
        }
        if name == WORK_THROTTLED:
            split = slot_split_of([run["events"] for run in done], WORK_CAP)
            report.add(split_line("P5", f"P2 at cap {WORK_CAP}, one worker, {label}", split))
            raw["split_ms" + ("_parked" if tag == "P2p" else "")] = split
    report.raw["P2"] = raw


def _p2_once(
    bench: Bench,
    tag: str,
    name: str,
    args: list[Any],
    group: str,
    n: int,
    ideal: float,
    timeout: float,
) -> dict[str, Any]:
    """One run of one P2 variant on a worker of its own."""
    env = {"BENCH_SPLIT": "1"} if name == WORK_THROTTLED else {}
    if tag == "P2p":
        env["BENCH_PARK"] = "1"
    # the floor: Celery's own hand-off, from one pool process's result to the next dispatch
    concurrency = WORK_CAP if tag == "P2f" else CONCURRENCY
    with bench.row(tag, 1, env, concurrency) as row:
        row.warm_up(name, [0.0, *args[1:]])
        row.forget(group)
        bench.redis.delete(f"{row.prefix}:probe:{group}:events")
        before = row.counter("recipe:retry:retries")
        _, done = row.run([(name, args)] * n, timeout)
        events: list[dict[str, Any]] = []
        if name == WORK_THROTTLED:
            raw_events = bench.redis.lrange(f"{row.prefix}:probe:{group}:events", 0, -1)
            events = [json.loads(e) for e in raw_events]
        return {
            "makespan_s": done.makespan(),
            "ratio": done.makespan() / ideal,
            "retries": row.counter("recipe:retry:retries") - before,
            "peak": row.peak(group),
            "slots": slot_profile(row.spans(group), WORK_CAP, done.started),
            "limiter": row.limiter_state(name) if name == WORK_THROTTLED else None,
            "events": events,
        }


def median_run(runs: Sequence[dict[str, Any]]) -> tuple[list[float], float, dict[str, Any]]:
    """The rounds' ratios, their median, and the run closest to it (the one the table shows)."""
    ratios = [run["ratio"] for run in runs]
    ratio = statistics.median(ratios)
    return ratios, ratio, min(runs, key=lambda run: abs(run["ratio"] - ratio))


def rounds_value(ratios: Sequence[float], makespan: float) -> str:
    """A ratio as the table shows it: one run's, or the median of several with each round's."""
    if len(ratios) == 1:
        return f"{ratios[0]:.3f} ({makespan:.2f} s)"
    each = " / ".join(f"{r:.3f}" for r in ratios)
    return f"{statistics.median(ratios):.3f} (median of {each})"


def p3_mixed_queue(bench: Bench, sizes: Sizes) -> None:
    """P3's variants, ``bench.rounds`` times in turn, each judged on the median of its rounds."""
    report, n = bench.report, sizes.work
    # 2n tasks of 50 ms on 8 processes; the capped half alone needs n * WORK / WORK_CAP.
    ideal = max(2 * n * WORK / CONCURRENCY, n * WORK / WORK_CAP)
    timeout = max(120.0, 30 * ideal)
    raw: dict[str, Any] = {"n_capped": n, "n_plain": n, "ideal_s": ideal, "rounds": bench.rounds}
    floor = f"floor: {2 * n} plain, no cap (the {CONCURRENCY} pool processes the only limit)"
    variants = (
        ("P3", WORK_THROTTLED, [WORK], "work_throttled", f"@throttled_task(limit={WORK_CAP})"),
        ("P3b", RECIPE_SPIN, [WORK, WORK_CAP], "recipe_spin", "recipe counter + spin"),
        # the floor: every task plain, so the 8 processes are the only cap (Celery's own hand-off)
        ("P3f", WORK_PLAIN, [WORK], "work_plain", floor),
    )
    runs: dict[str, list[dict[str, Any]]] = {tag: [] for tag, *_ in variants}
    for _ in range(bench.rounds):
        for tag, capped, args, group, _label in variants:
            runs[tag].append(_p3_once(bench, tag, capped, args, group, n, ideal, timeout))
    for tag, capped, _args, group, label in variants:
        done = runs[tag]
        ratios, ratio, middle = median_run(done)
        if tag == "P3f":
            report.add(
                Line(
                    "P3",
                    f"{label}: all done / ideal ({ideal:.2f} s)",
                    rounds_value(ratios, middle["makespan_s"]),
                ),
                profile_line("P3", label, middle["slots"]),
            )
            raw["floor"] = {
                "makespan_s": middle["makespan_s"],
                "ratio": ratio,
                "ratios": ratios,
                "slots": middle["slots"],
            }
            continue
        line = Line(
            "P3",
            f"{label} + {n} plain, interleaved: all done / ideal ({ideal:.2f} s)",
            rounds_value(ratios, middle["makespan_s"]),
        )
        if capped == WORK_THROTTLED:
            line.target, line.met = "<= 1.05", ratio <= 1.05
            for run in done:
                cap_check(report, tag, run["limiter"], WORK_CAP)
        report.add(
            line,
            Line(
                "P3",
                f"{label}: capped / plain tasks all done after",
                f"{middle['capped_done_s']:.2f} / {middle['plain_done_s']:.2f} s",
            ),
            profile_line("P3", label, middle["slots"]),
        )
        peak, peak_plain = max(run["peak"] for run in done), max(r["peak_plain"] for r in done)
        report.peak("P3", label, peak, WORK_CAP)
        report.peak("P3", f"plain beside {label}", peak_plain, None)
        raw[group] = {
            "ratio": ratio,
            "ratios": ratios,
            "makespan_s": middle["makespan_s"],
            "peak": peak,
            "peak_plain": peak_plain,
            "plain_done_s": middle["plain_done_s"],
            "capped_done_s": middle["capped_done_s"],
            "slots": middle["slots"],
            "limiter": [run["limiter"] for run in done],
        }
    report.raw["P3"] = raw


def _p3_once(
    bench: Bench,
    tag: str,
    capped: str,
    args: list[Any],
    group: str,
    n: int,
    ideal: float,
    timeout: float,
) -> dict[str, Any]:
    """One run of one P3 variant: ``n`` of ``capped`` and ``n`` plain tasks interleaved (the
    floor: ``2 n`` plain)."""
    with bench.row(tag) as row:
        row.warm_up(capped, [0.0, *args[1:]])
        row.warm_up(WORK_PLAIN, [0.0])
        row.forget(group)
        jobs: list[Job] = []
        for _ in range(n):
            jobs += [(capped, args), (WORK_PLAIN, [WORK])]
        ids, done = row.run(jobs, timeout)
        cap = CONCURRENCY if capped == WORK_PLAIN else WORK_CAP
        return {
            "makespan_s": done.makespan(),
            "ratio": done.makespan() / ideal,
            "peak": row.peak(group),
            "peak_plain": row.peak("work_plain"),
            "plain_done_s": done.makespan(ids[1::2]),
            "capped_done_s": done.makespan(ids[0::2]),
            "slots": slot_profile(row.spans(group), cap, done.started),
            "limiter": row.limiter_state(capped) if capped == WORK_THROTTLED else None,
        }


def p4_handoff(bench: Bench, sizes: Sizes) -> None:
    """P4 as configured by default, then with ``throttle_park=True``, one after the other."""
    _p4_once(bench, sizes, "P4", "")
    _p4_once(bench, sizes, "P4p", "throttle_park=True")


def _p4_once(bench: Bench, sizes: Sizes, tag: str, setting: str) -> None:
    report, n = bench.report, sizes.handoff
    ideal = n * HANDOFF_WORK
    events_key = "probe:handoff:events"
    env = {"BENCH_SPLIT": "1", **({"BENCH_PARK": "1"} if setting else {})}
    label = f", {setting}" if setting else ""
    with bench.row(tag, workers=2, env=env) as row:
        row.warm_up(NOOP_PLAIN, [False], n=4 * CONCURRENCY)
        row.warm_up(HANDOFF, [-1, 0.0])
        bench.redis.delete(f"{row.prefix}:{events_key}")
        _, done = row.run([(HANDOFF, [k, HANDOFF_WORK]) for k in range(n)], max(120.0, 30 * ideal))
        events = [json.loads(e) for e in bench.redis.lrange(f"{row.prefix}:{events_key}", 0, -1)]
        peak = row.peak("handoff")
        state = row.limiter_state(HANDOFF)
    events.sort(key=lambda e: e["start"])
    cross: list[float] = []
    same: list[float] = []
    for before, after in pairwise(events):
        gap_ms = (after["start"] - before["end"]) * 1000
        (cross if before["host"] != after["host"] else same).append(gap_ms)
    hosts = Counter(e["host"] for e in events)
    p99 = percentile(cross, 99)
    report.add(
        Line(
            "P4",
            f"{n} x 20 ms at cap {HANDOFF_CAP} on 2 workers{label}: tasks per worker",
            " / ".join(str(c) for c in hosts.values()),
        ),
        Line(
            "P4",
            f"hand-off across workers{label}, p50 ({len(cross)} pairs)",
            f"{percentile(cross, 50):.1f} ms",
        ),
        Line(
            "P4",
            f"hand-off across workers{label}, p99",
            f"{p99:.1f} ms",
            "<= 10 ms",
            None if not cross else p99 <= 10,
        ),
        Line(
            "P4",
            f"hand-off on the same worker{label}, p50 / p99 ({len(same)} pairs)",
            f"{percentile(same, 50):.1f} / {percentile(same, 99):.1f} ms",
        ),
        Line(
            "P4",
            f"makespan / ideal{label} ({ideal:.1f} s)",
            f"{done.makespan() / ideal:.3f} ({done.makespan():.2f} s)",
        ),
    )
    split = handoff_split(events)
    for where, stages in split.items():
        report.add(split_line("P5", f"P4 {where}{label}", stages))
    report.peak("P4", f"cap {HANDOFF_CAP} across 2 workers{label}", peak, HANDOFF_CAP)
    cap_check(report, tag, state, HANDOFF_CAP)
    report.raw["P4" + ("_parked" if setting else "")] = {
        "n": n,
        "work_s": HANDOFF_WORK,
        "makespan_s": done.makespan(),
        "ideal_s": ideal,
        "peak": peak,
        "tasks_per_worker": dict(hosts),
        "cross_worker_ms": cross,
        "same_worker_ms": same,
        "cross_p50_ms": percentile(cross, 50),
        "cross_p99_ms": p99,
        "same_p50_ms": percentile(same, 50),
        "same_p99_ms": percentile(same, 99),
        "events": events,
        "split_ms": split,
        "limiter": state,
    }


def split_line(row: str, what: str, stages: dict[str, list[float]]) -> Line:
    return Line(
        row,
        f"hand-off split, {what}, p50 / p99: body end -> slot free -> waiter granted -> "
        "waiter running",
        "; ".join(
            f"{percentile(gaps, 50):.1f} / {percentile(gaps, 99):.1f}" for gaps in stages.values()
        )
        + " ms",
    )


def slot_split(events: Sequence[dict[str, Any]], cap: int) -> dict[str, list[float]]:
    """A capped row's hand-offs in three stages, in ms: the k-th slot freed goes to the
    (k + cap)-th admission (the first ``cap`` found their slots free)."""
    freed = [e for e in events if e.get("freed") is not None and e.get("admitted")]
    by_free = sorted(freed, key=lambda e: e["freed"])
    by_admit = sorted(freed, key=lambda e: e["admitted"])
    stages: dict[str, list[float]] = {"freed": [], "granted": [], "running": []}
    for before, after in zip(by_free, by_admit[cap:], strict=False):
        stages["freed"].append((before["freed"] - before["end"]) * 1000)
        stages["granted"].append((after["admitted"] - before["freed"]) * 1000)
        stages["running"].append((after["start"] - after["admitted"]) * 1000)
    return stages


def slot_split_of(runs: Sequence[Sequence[dict[str, Any]]], cap: int) -> dict[str, list[float]]:
    """:func:`slot_split` of several runs, their hand-offs pooled."""
    stages: dict[str, list[float]] = {"freed": [], "granted": [], "running": []}
    for events in runs:
        for stage, gaps in slot_split(events, cap).items():
            stages[stage] += gaps
    return stages


def handoff_split(events: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Each hand-off (one body's end to the next body's start, events sorted by start) in three
    stages, in ms, across workers and on the same worker."""
    split: dict[str, dict[str, list[float]]] = {}
    for before, after in pairwise(events):
        if before.get("freed") is None or after.get("admitted") is None:
            continue
        where = "across workers" if before["host"] != after["host"] else "on the same worker"
        stages = split.setdefault(where, {"freed": [], "granted": [], "running": []})
        stages["freed"].append((before["freed"] - before["end"]) * 1000)
        stages["granted"].append((after["admitted"] - before["freed"]) * 1000)
        stages["running"].append((after["start"] - after["admitted"]) * 1000)
    return split


RUNNERS: dict[str, Callable[[Bench, Sizes], None]] = {
    "P1": p1_noop,
    "P2": p2_capped_work,
    "P3": p3_mixed_queue,
    "P4": p4_handoff,
}


# -- output ----------------------------------------------------------------------------------
def table(lines: Sequence[Line]) -> str:
    header = ["row", "measure", "value", "target", "met?"]
    rows = [header, ["---"] * len(header)] + [line.cells() for line in lines]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)) + " |"
        for r in rows
    )


def environment(redis_url: str) -> dict[str, Any]:
    info = redis.Redis.from_url(redis_url).info("server")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis_py": redis.__version__,
        "redis_server": info.get("redis_version"),
        "redis_private": not os.environ.get("REDIS_URL"),
        "celery_throttled": celery_throttled.__version__,
        "worker": {
            "pool": "prefork",
            "concurrency": CONCURRENCY,
            "prefetch_multiplier": 1,
            "serializer": "json",
            "broker": "redis",
            "result_backend": "redis",
        },
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, for a smoke run")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every batch size (10: P1 at 10 000 tasks)",
    )
    parser.add_argument(
        "--rows", default=",".join(ROWS), help="comma-separated rows to run (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run P2's and P3's variants this many times in turn; each is judged on its median",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    parser.add_argument("--loglevel", default="warning", help="worker log level")
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the workers' logs (default: kept only when the run fails)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    args.rows = [r.strip().upper() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))  # run as a script: the checkout's ``benchmarks`` package
    from benchmarks.harness import worker_logs

    with worker_logs("bench-cap", keep=args.keep_logs) as logs:
        return logs.outcome(run(args, logs.path))


def run(args: argparse.Namespace, logdir: Path) -> int:
    from benchmarks.harness import run_rows

    sizes = Sizes.of(args.quick, args.scale)
    began = time.monotonic()
    with redis_for_bench() as url:
        bench = Bench(url, logdir, args.loglevel, args.rounds)
        env = environment(url)
        run_rows(bench, args.rows, RUNNERS, sizes)
    report = bench.report
    elapsed = time.monotonic() - began
    env["loadavg_at_end"] = os.getloadavg()

    print()
    print(table(report.lines))
    print(
        f"\n{'quick' if args.quick else 'full'} run of {', '.join(args.rows)} took "
        f"{elapsed:.0f} s on {env['cpu_count']} CPUs"
    )
    for name, problems in report.logs.items():
        if problems["tracebacks"] or problems["errors"] or problems["exit"] not in (0, None):
            print(
                f"worker {name}: exit {problems['exit']}, {problems['tracebacks']} "
                f"traceback(s), {problems['errors']} error line(s): {problems['log']}"
            )
    for message in report.violations:
        print(message)
    for message in report.notes:
        print(f"NOTE: {message}")
    for message in report.errors:
        print(f"ERROR: {message}")

    write_json(
        args.out,
        {
            "environment": env,
            "quick": args.quick,
            "scale": args.scale,
            "rows": args.rows,
            "rounds": args.rounds,
            "elapsed_s": elapsed,
            "sizes": asdict(sizes),
            "table": [line.__dict__ for line in report.lines],
            "raw": report.raw,
            "violations": report.violations,
            "errors": report.errors,
            "notes": report.notes,
            "worker_logs": report.logs,
        },
    )
    print(f"results written to {args.out}")
    if report.violations:
        return 1
    return 2 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
