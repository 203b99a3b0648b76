"""Benchmark adaptive caps beside fixed ones, in one run.

    python benchmarks/bench_adaptive.py [--quick] [--rows A1,A2]

Every row runs two real ``celery worker`` subprocesses (prefork, concurrency 8, prefetch
multiplier 1, json, Redis broker and result backend) of ``benchmarks/bench_app.py`` (whose
adaptive tasks are in ``benchmarks/adaptive_app.py``), on its own queue and key prefix, so each
adaptive key starts fresh. The downstream is a counter in Redis: it serves ``capacity`` calls at
once and refuses the others at once; a refused call raises ``Overloaded``, which the task's
``RetryPolicy`` retries at once, through the broker.

* A1  a downstream that serves 4 at once (unknown to the app): 400 calls of 50 ms, with
      ``Adaptive(initial=16, min=1, max=64)``: overloaded calls (target <= 5 %) and the makespan
      against the ideal 400 x 0.05 / 4 = 5 s (target <= 1.25); beside fixed ``limit=16`` and
      fixed ``limit=4``.
* A2  the capacity stepped 5 -> 12 -> 3 during one run (6 s each; 3 until the end), a backlog
      all along: after each step, how long until the cap is within 25 % of the new capacity
      (target <= 5 s); overloaded calls over the run (target <= 5 %); calls served a second in
      the 12 phase against a fixed ``limit=12`` at capacity 12 (target >= 80 %).

Times run from the first submission to the last result's ``date_done``; the cap is sampled from
Redis every 50 ms. Prints a markdown table and writes every raw figure (the cap's trace
included) to ``benchmarks/results/bench_adaptive.json``. Exit status: 0 even when a target is
missed; 2 when a row could not be completed.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_cap import (  # noqa: E402
    CONCURRENCY,
    Bench,
    Line,
    Row,
)
from benchmarks.harness import rows_main  # noqa: E402
from benchmarks.sampling import Periodic  # noqa: E402
from celery_throttled.keys import Family  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_adaptive.json"
WORKERS = 2
DURATION = 0.05
ADAPTIVE = "bench.adaptive_call"


@dataclass(frozen=True)
class Sizes:
    calls: int
    phase_s: float

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        return cls(160, 4.0) if quick else cls(400, 6.0)


class CapTrace(Periodic):
    """Samples the adaptive key's cap (the integer that admits) every 50 ms, in a thread."""

    def __init__(self, row: Row, key: str = ADAPTIVE) -> None:
        super().__init__()
        self.meta = Family.of(row.prefix, key).meta
        self.redis = row.bench.redis
        self.samples: list[tuple[float, int]] = []

    def sample(self) -> None:
        acap, pin = self.redis.hmget(self.meta, "acap", "override")
        if acap is not None:
            cap = int(pin) if pin is not None else int(float(acap))
            self.samples.append((time.time(), cap))

    def settled_after(self, since: float, capacity: int) -> float | None:
        """Seconds from ``since`` until the cap was first within 25 % of ``capacity``."""
        for at, cap in self.samples:
            if at >= since and abs(cap - capacity) <= 0.25 * capacity:
                return at - since
        return None

    def share_within(self, start: float, end: float, capacity: int) -> float | None:
        """The share of the samples in [start, end) within 25 % of ``capacity``."""
        inside = [cap for at, cap in self.samples if start <= at < end]
        if not inside:
            return None
        return sum(abs(cap - capacity) <= 0.25 * capacity for cap in inside) / len(inside)


def downstream(row: Row, capacity: int) -> None:
    row.bench.redis.set(f"{row.prefix}:down:cap", capacity)


def calls(row: Row) -> tuple[int, int]:
    """(served, refused) calls so far."""
    return row.counter("down:served"), row.counter("down:refused")


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


# -- A1 ---------------------------------------------------------------------------------------
def a1_fixed_capacity(bench: Bench, sizes: Sizes) -> None:
    report, n = bench.report, sizes.calls
    ideal = n * DURATION / 4
    raw: dict[str, Any] = {"n": n, "capacity": 4, "duration_s": DURATION, "ideal_s": ideal}
    variants = (
        (ADAPTIVE, "adaptive", "Adaptive(initial=16, min=1, max=64)"),
        ("bench.fixed16_call", "fixed16", "fixed limit=16"),
        ("bench.fixed4_call", "fixed4", "fixed limit=4 (the capacity, known)"),
    )
    for name, group, label in variants:
        with bench.row(f"A1{group}", workers=WORKERS) as row:
            downstream(row, 4)
            row.warm_up("bench.flow_warm", [], n=4 * CONCURRENCY)
            with CapTrace(row) as trace:
                _, done = row.run([(name, [DURATION])] * n, timeout=300)
            served, refused = calls(row)
        makespan = done.makespan()
        share = refused / (served + refused)
        raw[group] = {
            "makespan_s": makespan,
            "ratio": makespan / ideal,
            "served": served,
            "refused": refused,
            "overloaded_share": share,
            "cap_trace": [(round(at - done.started, 3), cap) for at, cap in trace.samples],
        }
        adaptive = group == "adaptive"
        report.add(
            Line(
                "A1",
                f"{label}: overloaded calls ({refused} of {served + refused})",
                pct(refused, served + refused),
                "<= 5 %" if adaptive else "",
                share <= 0.05 if adaptive else None,
            ),
            Line(
                "A1",
                f"{label}: makespan / ideal ({ideal:.1f} s)",
                f"{makespan / ideal:.2f} ({makespan:.2f} s)",
                "<= 1.25" if adaptive else "",
                makespan / ideal <= 1.25 if adaptive else None,
            ),
        )
        if adaptive and trace.samples:
            final = trace.samples[-1][1]
            report.add(Line("A1", f"{label}: cap at the end (capacity 4)", str(final)))
    report.raw["A1"] = raw


# -- A2 ---------------------------------------------------------------------------------------
def a2_stepped_capacity(bench: Bench, sizes: Sizes) -> None:
    report, phase = bench.report, sizes.phase_s
    steps = (5, 12, 3)
    n = int(phase * sum(capacity / DURATION for capacity in steps))
    raw: dict[str, Any] = {"n": n, "steps": steps, "phase_s": phase, "duration_s": DURATION}
    with bench.row("A2fixed12", workers=WORKERS) as row:
        downstream(row, 12)
        row.warm_up("bench.flow_warm", [], n=4 * CONCURRENCY)
        row.run([("bench.fixed12_call", [DURATION])] * int(phase * 12 / DURATION), timeout=300)
        spans = row.spans("fixed12")
        fixed_rate = len(spans) / (max(e for _, e in spans) - min(s for s, _ in spans))
    with bench.row("A2adaptive", workers=WORKERS) as row:
        downstream(row, steps[0])
        row.warm_up("bench.flow_warm", [], n=4 * CONCURRENCY)
        at: list[float] = []

        def stepper() -> None:
            for capacity in steps:
                at.append(time.time())
                downstream(row, capacity)
                time.sleep(phase)

        with CapTrace(row) as trace:
            thread = threading.Thread(target=stepper, daemon=True)
            thread.start()
            _, done = row.run([(ADAPTIVE, [DURATION])] * n, timeout=600)
            thread.join()
        served, refused = calls(row)
        spans = row.spans("adaptive")
    share = refused / (served + refused)
    in_twelve = sum(1 for _, end in spans if at[1] <= end < at[2]) / (at[2] - at[1])
    ends = [at[1], at[2], time.time()]
    settled = [trace.settled_after(at[i], c) for i, c in enumerate(steps)]
    shares = [
        trace.share_within(at[i] + 5.0, ends[i], c) if i else None for i, c in enumerate(steps)
    ]
    raw.update(
        {
            "makespan_s": done.makespan(),
            "served": served,
            "refused": refused,
            "overloaded_share": share,
            "settled_s": settled,
            "share_within_25pct_after_5s": shares,
            "served_per_s_in_12_phase": in_twelve,
            "fixed12_served_per_s": fixed_rate,
            "cap_trace": [(round(t - at[0], 3), cap) for t, cap in trace.samples],
        }
    )
    for capacity, seconds in zip(steps, settled, strict=True):
        report.add(
            Line(
                "A2",
                f"cap within 25 % of the new capacity {capacity}, after the step",
                "never" if seconds is None else f"{seconds:.2f} s",
                "<= 5 s",
                seconds is not None and seconds <= 5.0,
            )
        )
    report.add(
        Line(
            "A2",
            f"overloaded calls over the run ({refused} of {served + refused})",
            pct(refused, served + refused),
            "<= 5 %",
            share <= 0.05,
        ),
        Line(
            "A2",
            "calls served a second in the 12 phase / fixed limit=12 at capacity 12",
            f"{in_twelve / fixed_rate:.2f} ({in_twelve:.0f} / {fixed_rate:.0f})",
            ">= 0.80",
            in_twelve / fixed_rate >= 0.80,
        ),
    )
    report.raw["A2"] = raw


RUNNERS: dict[str, Callable[[Bench, Sizes], None]] = {
    "A1": a1_fixed_capacity,
    "A2": a2_stepped_capacity,
}


def main(argv: Sequence[str] | None = None) -> int:
    return rows_main(argv, __doc__, "bench-adaptive", RUNNERS, Sizes.of, RESULTS, WORKERS)


if __name__ == "__main__":
    sys.exit(main())
