"""Benchmark flow control beside what people use without it, in one run.

    python benchmarks/bench_flow.py [--quick] [--rows R1,F1,B1,C1] [--merge] [--keep-logs]

Every row runs two real ``celery worker`` subprocesses (prefork, concurrency 8, prefetch
multiplier 1, json, Redis broker and result backend) of ``benchmarks/bench_app.py`` (whose
flow tasks are in ``benchmarks/flow_app.py``), on its own queue and key prefix:

* R1  ``rate="50/s"``, 500 x 10 ms over the two workers: the most starts in any 1 s window
      (target <= 51) and the run against 10 s (target within 5 %), where a start is the moment
      the rate admitted the task, stamped by Redis as the grant ran (the clock the rate is
      decided by), and also the moment its body began in a pool process (the admission plus
      the hand-off to the pool, whose delay varies by a few ms to tens of ms); beside Celery's
      ``rate_limit="50/s"`` on the same two workers (kept per worker: about twice the rate), and
      with kombu's event loop as shipped, as on a worker without the gate
      (``flow_app.kombu_timers_as_shipped`` says why that matters), and the hand-written recipe
      "a counter per second in Redis, retry at the next second".
* F1  ``limit=6, total=6`` per tenant key: one tenant submits 600 x 50 ms, then ten tenants 5
      each: how long after its submission each small tenant was done (target <= 1.5 s); beside
      the same load behind one shared key (first come first served).
* B1  ``limit=4, max_pending=100`` (80 tasks/s of service): a producer submits at ten times
      that for 5 s: the most pending ever seen (target <= 100), every accepted task done, every
      refused one refused at submit (nothing else ran).
* C1  the admission step's cost: no-ops behind a cap, a family's total and a rate (none
      binding) against the cap alone, both over the same ten keys, on one worker, alternating
      three times, best of each; with the lease scripts and the Redis CPU per task.

Times run from the first submission to the last result's ``date_done``; body starts are the
bodies' own clocks (one host: every process reads the same clock). Prints a markdown table and
writes every raw figure to ``benchmarks/results/bench_flow.json`` (with ``--merge``, the rows run
replace theirs in that file and the others keep their figures). Exit status: 0 even when a
target is missed; 2 when a row could not be completed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import flow_app  # noqa: E402
from benchmarks.bench_cap import (  # noqa: E402
    CONCURRENCY,
    Bench,
    Line,
    Row,
    percentile,
)
from benchmarks.harness import rows_main  # noqa: E402
from benchmarks.sampling import MonitorReader, Periodic  # noqa: E402
from celery_throttled import Backpressure  # noqa: E402
from celery_throttled.keys import Family  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_flow.json"
WORKERS = 2


@dataclass(frozen=True)
class Sizes:
    rated: int
    big: int
    small: int
    bounded_s: float
    noop: int

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        return cls(100, 120, 2, 2.0, 300) if quick else cls(500, 600, 5, 5.0, 1000)


def most_in_any_window(stamps: Sequence[float], window: float) -> int:
    """The largest number of ``stamps`` inside any closed interval of ``window`` seconds."""
    ordered = sorted(stamps)
    best = first = 0
    for last, stamp in enumerate(ordered):
        while stamp - ordered[first] > window:
            first += 1
        best = max(best, last - first + 1)
    return best


def starts(row: Row, group: str) -> list[float]:
    return sorted(start for start, _ in row.spans(group))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Admissions(MonitorReader):
    """When each holder of a key was admitted, in Redis time, read from MONITOR.

    A grant adds the holder to the key's holders set inside the lease script, in the same step
    that takes the rate's token; MONITOR stamps each command a script runs with the server's
    clock (``<epoch s> [0 lua] "ZADD" "<holders>" "<expiry>" "<holder>"``). The first ZADD of a
    holder is its admission (later ones renew its lease).
    """

    def __init__(self, url: str, holders: str) -> None:
        super().__init__(url)
        self.holders = holders.encode()
        self.at: dict[bytes, float] = {}

    def line(self, line: bytes) -> None:
        parts = line.split(b'"')
        if len(parts) == 9 and parts[1] == b"ZADD" and parts[3] == self.holders:
            self.at.setdefault(parts[7], float(parts[0].split()[0]))


# -- R1 ---------------------------------------------------------------------------------------
def r1_rate(bench: Bench, sizes: Sizes) -> None:
    report, n = bench.report, sizes.rated
    ideal = (n - 1) / flow_app.RATE_PER_SECOND
    raw: dict[str, Any] = {"n": n, "rate": flow_app.RATE, "ideal_s": ideal}
    celery = f'Celery rate_limit="{flow_app.RATE}"'
    variants: tuple[tuple[str, str, str, dict[str, str]], ...] = (
        ("bench.flow_rated", "rated", f'@throttled_task(rate="{flow_app.RATE}")', {}),
        ("bench.flow_celery_rate", "celery_rate", f"{celery} on a worker with the gate", {}),
        (
            "bench.flow_celery_rate",
            "celery_rate_as_shipped",
            f"{celery}, kombu's event loop as shipped (a worker without the gate)",
            {"BENCH_KOMBU_AS_SHIPPED": "1"},
        ),
        ("bench.flow_recipe_rate", "recipe_rate", "recipe: counter per second + retry", {}),
    )
    for name, group, label, env in variants:
        with bench.row(f"R1{group}", workers=WORKERS, env=env) as row:
            row.warm_up("bench.flow_warm", [], n=4 * CONCURRENCY)
            with Admissions(bench.redis_url, Family.of(row.prefix, name).holders) as admitted:
                _, done = row.run([(name, [0.01])] * n, timeout=max(300.0, 30 * ideal))
            stamps = starts(row, group.removesuffix("_as_shipped"))
            window = most_in_any_window(stamps, 1.0)
            gaps = [b - a for a, b in pairwise(stamps)]
            span = stamps[-1] - stamps[0]
            retries = row.counter("recipe:rate:retries")
        makespan = done.makespan()
        raw[group] = {
            "makespan_s": makespan,
            "first_to_last_start_s": span,
            "most_in_1s": window,
            "starts": len(stamps),
            "retries": retries,
            "start_offsets_s": [round(s - stamps[0], 4) for s in stamps],
        }
        if group == "rated":
            logged = bench.redis.hgetall(f"{row.prefix}:probe:rated:began")
            began = {_text(task_id): float(at) for task_id, at in logged.items()}
            by_task = {holder.decode().rsplit(" ", 1)[-1]: at for holder, at in admitted.at.items()}
            admissions = sorted(by_task.values())
            most = most_in_any_window(admissions, 1.0)
            run = admissions[-1] - admissions[0]
            tightest = min(b - a for a, b in zip(admissions, admissions[52 - 1 :], strict=False))
            delays = [began[t] - by_task[t] for t in began if t in by_task]
            raw[group].update(
                {
                    "admissions": len(admissions),
                    "most_admitted_in_1s": most,
                    "first_to_last_admission_s": run,
                    "tightest_52_admissions_s": tightest,
                    "admission_to_body_s": [round(d, 5) for d in delays],
                    "admission_offsets_s": [round(a - admissions[0], 4) for a in admissions],
                }
            )
            report.add(
                Line(
                    "R1",
                    f"{label}: most admitted in any 1 s window (Redis clock, as the grant ran)",
                    f"{most} (of {len(admissions)})",
                    "<= 51",
                    most <= flow_app.RATE_PER_SECOND + 1,
                ),
                Line(
                    "R1",
                    f"{label}: run (first to last admission) / ideal {ideal:.2f} s",
                    f"{run:.2f} s ({run / ideal:.3f})",
                    "within 5 %",
                    abs(run / ideal - 1) <= 0.05,
                ),
                Line(
                    "R1",
                    f"{label}: most body starts in any 1 s window (pool processes' clock)",
                    str(window),
                    "<= 51",
                    window <= flow_app.RATE_PER_SECOND + 1,
                ),
                Line(
                    "R1",
                    f"{label}: run (first to last body start) / ideal {ideal:.2f} s",
                    f"{span:.2f} s ({span / ideal:.3f})",
                    "within 5 %",
                    abs(span / ideal - 1) <= 0.05,
                ),
                Line(
                    "R1",
                    f"{label}: admission to body start p50 / p99 / max; any 52 admissions span",
                    " / ".join(f"{percentile(delays, q) * 1000:.1f}" for q in (50, 99))
                    + f" / {max(delays) * 1000:.1f} ms; {tightest * 1000:.0f} ms",
                ),
                Line(
                    "R1",
                    f"{label}: gap between body starts p1 / p50 / p99",
                    " / ".join(f"{percentile(gaps, q) * 1000:.0f}" for q in (1, 50, 99)) + " ms",
                ),
                Line("R1", f"{label}: makespan (submit to last done)", f"{makespan:.2f} s"),
            )
        else:
            extra = f", {retries} retries" if retries else ""
            report.add(
                Line(
                    "R1",
                    f"{label}: most in any 1 s; first to last start{extra}",
                    f"{window}; {span:.2f} s",
                )
            )
    report.raw["R1"] = raw


# -- F1 ---------------------------------------------------------------------------------------
def f1_fair(bench: Bench, sizes: Sizes) -> None:
    report = bench.report
    raw: dict[str, Any] = {
        "big": sizes.big,
        "small_tenants": 10,
        "small_each": sizes.small,
        "work_s": 0.05,
        "cap": flow_app.FAIR_CAP,
    }
    for name, group, label in (
        ("bench.flow_tenant", "fair", f"limit={flow_app.FAIR_CAP}, total={flow_app.FAIR_CAP}"),
        ("bench.flow_shared", "shared", f"one shared key, limit={flow_app.FAIR_CAP}"),
    ):
        with bench.row(f"F1{group}", workers=WORKERS) as row:
            row.warm_up("bench.flow_warm", [], n=4 * CONCURRENCY)
            client = bench.client
            sent_at: dict[str, float] = {}
            ids: dict[str, list[str]] = {}
            with client.producer_or_acquire() as producer:
                began = time.time()
                plan = [("big", sizes.big)] + [(f"small{i}", sizes.small) for i in range(10)]
                for tenant, count in plan:
                    sent_at[tenant] = time.time()
                    ids[tenant] = [
                        client.send_task(
                            name, args=[tenant, 0.05], queue=row.prefix, producer=producer
                        ).id
                        for _ in range(count)
                    ]
            done = bench.wait([i for batch in ids.values() for i in batch], began, 300)
            if not done.complete:
                raise RuntimeError(f"F1 {group}: {done.missing} tasks never finished")
            peak = row.peak(group)
        waits = {t: max(done.finished[i] for i in batch) - sent_at[t] for t, batch in ids.items()}
        small = [w for t, w in waits.items() if t != "big"]
        raw[group] = {"small_done_after_s": waits, "peak": peak, "makespan_s": done.makespan()}
        if group == "fair":
            report.add(
                Line(
                    "F1",
                    f"{label}: every small tenant done after its submission (worst)",
                    f"{max(small):.2f} s",
                    "<= 1.5 s",
                    max(small) <= 1.5,
                ),
                Line(
                    "F1",
                    f"{label}: big tenant done; peak concurrency",
                    f"{waits['big']:.2f} s; {peak}",
                    f"peak <= {flow_app.FAIR_CAP}",
                    peak <= flow_app.FAIR_CAP,
                ),
            )
        else:
            report.add(
                Line(
                    "F1",
                    f"{label}: small tenants done after submission (worst); big",
                    f"{max(small):.2f} s; {waits['big']:.2f} s",
                )
            )
    report.raw["F1"] = raw


# -- B1 ---------------------------------------------------------------------------------------
class PendingSampler(Periodic):
    """The most pending tasks of a key seen, read every 10 ms."""

    interval = 0.01

    def __init__(self, bench: Bench, pending_key: str) -> None:
        super().__init__()
        self.bench, self.key, self.highest, self.samples = bench, pending_key, 0, 0

    def sample(self) -> None:
        seconds, micros = self.bench.redis.time()
        count = int(self.bench.redis.zcount(self.key, seconds * 1000 + micros // 1000, "+inf"))
        self.highest, self.samples = max(self.highest, count), self.samples + 1


def b1_backpressure(bench: Bench, sizes: Sizes) -> None:
    report = bench.report
    service = flow_app.BOUNDED_CAP / 0.05
    target_rate = 10 * service
    with bench.row("B1", workers=WORKERS) as row:
        row.warm_up("bench.flow_warm", [], n=4 * CONCURRENCY)
        producer = Celery("bench-producer", broker=bench.redis_url, set_as_current=False)
        producer.conf.update(
            task_serializer="json",
            accept_content=["json"],
            throttle_key_prefix=row.prefix,
            throttle_redis_url=bench.redis_url,
        )
        task = producer.tasks["bench.flow_bounded"]
        pending = Family.of(row.prefix, "bench.flow_bounded").pending
        sampler = PendingSampler(bench, pending).start()
        accepted: list[str] = []
        refused = 0
        began = time.time()
        with producer.producer_or_acquire() as publisher:
            while (elapsed := time.time() - began) < sizes.bounded_s:
                try:
                    accepted.append(
                        task.apply_async([0.05], queue=row.prefix, producer=publisher).id
                    )
                except Backpressure:
                    refused += 1
                ahead = (len(accepted) + refused) / target_rate - elapsed
                if ahead > 0:
                    time.sleep(ahead)
        submitted_s = time.time() - began
        done = bench.wait(accepted, began, 300)
        sampler.stop()
        highest = sampler.highest
        ran = len(row.spans("bounded"))
        peak = row.peak("bounded")
        producer.close()
    attempts = len(accepted) + refused
    report.add(
        Line(
            "B1",
            f"submitted at {attempts / submitted_s:.0f}/s for {submitted_s:.1f} s "
            f"(service {service:.0f}/s): accepted / refused at submit",
            f"{len(accepted)} / {refused}",
        ),
        Line(
            "B1",
            f"most pending seen ({sampler.samples} samples)",
            str(highest),
            "<= 100",
            highest <= flow_app.MAX_PENDING,
        ),
        Line(
            "B1",
            "accepted tasks done; bodies run; peak concurrency",
            f"{sum(done.statuses.values())}/{len(accepted)}; {ran}; {peak}",
            f"all; {len(accepted)}; <= {flow_app.BOUNDED_CAP}",
            done.complete and ran == len(accepted) and peak <= flow_app.BOUNDED_CAP,
        ),
    )
    report.raw["B1"] = {
        "accepted": len(accepted),
        "refused": refused,
        "submit_rate": attempts / submitted_s,
        "service_rate": service,
        "highest_pending": highest,
        "samples": sampler.samples,
        "done": sum(done.statuses.values()),
        "bodies": ran,
        "peak": peak,
    }


# -- C1 ---------------------------------------------------------------------------------------
def c1_cost(bench: Bench, sizes: Sizes) -> None:
    report, n = bench.report, sizes.noop
    cap_only, flow = "bench.flow_noop_cap", "bench.flow_noop"
    makespans: dict[str, list[float]] = {cap_only: [], flow: []}
    scripts: dict[str, list[float]] = {cap_only: [], flow: []}
    redis_cpu: dict[str, list[float]] = {cap_only: [], flow: []}

    def script_calls() -> int:
        stats = bench.redis.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))

    with bench.row("C1", workers=1) as row:
        for name in (cap_only, flow):
            row.run([(name, [i]) for i in range(4 * CONCURRENCY)], timeout=60)
        for name in (cap_only, flow) * 3:
            jobs = [(name, [i]) for i in range(n)]
            before, calls = row.cpu(), script_calls()
            _, done = row.run(jobs, max(120.0, n / 20))
            after = row.cpu()
            makespans[name].append(done.makespan())
            scripts[name].append((script_calls() - calls) / n)
            redis_cpu[name].append((after["redis"] - before["redis"]) / n * 1e6)
    base, with_flow = min(makespans[cap_only]), min(makespans[flow])
    ratio = base / with_flow
    report.add(
        Line(
            "C1",
            f"{n} no-ops over 10 keys, cap alone (limit={flow_app.NEVER_BINDS}), best of 3",
            f"{n / base:.0f} tasks/s",
        ),
        Line(
            "C1",
            "same with a rate and a family's total (none binding), best of 3",
            f"{n / with_flow:.0f} tasks/s",
        ),
        Line("C1", "throughput ratio with rate and fairness / cap alone", f"{ratio:.2f}"),
        Line(
            "C1",
            "lease scripts per task; Redis CPU per task: cap alone / with both",
            f"{min(scripts[cap_only]):.2f} / {min(scripts[flow]):.2f}; "
            f"{min(redis_cpu[cap_only]):.0f} / {min(redis_cpu[flow]):.0f} µs",
        ),
    )
    report.raw["C1"] = {
        "n": n,
        "makespans_s": makespans,
        "ratio": ratio,
        "scripts_per_task": scripts,
        "redis_cpu_us_per_task": redis_cpu,
    }


RUNNERS: dict[str, Callable[[Bench, Sizes], None]] = {
    "R1": r1_rate,
    "F1": f1_fair,
    "B1": b1_backpressure,
    "C1": c1_cost,
}


def main(argv: Sequence[str] | None = None) -> int:
    return rows_main(argv, __doc__, "bench-flow", RUNNERS, Sizes.of, RESULTS, WORKERS)


if __name__ == "__main__":
    sys.exit(main())
