"""P7: what happens to the siblings after the first failure, errgroup beside a plain chord.

    python benchmarks/bench_errgroup.py [--quick] [--repeat N]

One worker of ``benchmarks/bench_app.py`` (prefork, concurrency 8, Redis broker and backend),
one group shape: member 0 fails after 0.1 s, fifteen siblings work for 2 s. Run in turn, each
``--repeat`` times (default 3), on the same worker:

* ``chord``: a plain Celery ``chord(group(...), body)`` of ``@shared_task`` members;
* ``errgroup``: ``errgroup(...) | body``, members that poll ``current_context()`` every 10 ms;
* ``errgroup terminate``: ``errgroup(..., terminate=True)``, members that never poll;
* ``errgroup limit=4 terminate``: the same at ``limit=4``.

Per run: the failure moment F (the failing member's end, stamped inside it), sibling starts
after F, the time from F until every member's result is stored (``date_done``), and the wasted
sibling-seconds: time siblings spent running after F (a stopped sibling's run ends when its
result is stored); for members that poll, how long after F the running ones saw
``current_context().cancelled`` (they poll every 10 ms; the context asks Redis every 50 ms).
Prints a table (medians and worst over the repeats) and writes every raw figure to
``benchmarks/results/bench_errgroup.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from celery import Celery, chord, group

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_cap import (  # noqa: E402
    Bench,
    Line,
    Row,
    environment,
    redis_for_bench,
    table,
    write_json,
)
from benchmarks.harness import add_keep_logs, worker_logs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_errgroup.json"
SIBLINGS, SECONDS, FAIL_AFTER = 15, 2.0, 0.1
SETTLE_TARGET = 0.5
SEEN_TARGET = 0.1


def client_for(row: Row) -> Celery:
    """A client with a result backend and the bench tasks registered, on the row's prefix."""
    os.environ.setdefault("REDIS_URL", row.bench.redis_url)
    import benchmarks.bench_app  # noqa: F401  (registers the shared tasks in every app)

    app = Celery(
        "p7-client", broker=row.bench.redis_url, backend=row.bench.redis_url, set_as_current=False
    )
    app.conf.update(
        task_default_queue=row.prefix,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        throttle_key_prefix=row.prefix,
        broker_connection_retry_on_startup=True,
    )
    app.tasks  # noqa: B018  (finalize)
    return app


def shape(app: Celery, name: str, **extra: Any) -> list[Any]:
    members = [app.signature(name, args=("s0", SECONDS), kwargs={"fail_after": FAIL_AFTER})]
    members += [
        app.signature(name, args=(f"s{i}", SECONDS), kwargs=extra) for i in range(1, SIBLINGS + 1)
    ]
    return members


def measure(row: Row, send: Callable[[], list[str]]) -> dict[str, Any]:
    r = row.bench.redis
    for what in ("starts", "ends"):
        r.delete(f"{row.prefix}:probe:p7:{what}")
    submitted = time.time()
    ids = send()
    done = row.bench.wait(ids, submitted, timeout=120)
    if done.missing:
        raise RuntimeError(f"{done.missing} of {len(ids)} members never settled")

    def events(what: str) -> dict[str, float]:
        raw = r.lrange(f"{row.prefix}:probe:p7:{what}", 0, -1)
        text = (item.decode() if isinstance(item, bytes) else str(item) for item in raw)
        return {label: float(at) for label, at in (line.split() for line in text)}

    starts, ends = events("starts"), events("ends")
    failed_at = ends["s0"]
    by_label = {f"s{i}": ids[i] for i in range(len(ids))}
    wasted = 0.0
    for label, began in starts.items():
        if label == "s0":
            continue
        end = ends.get(label, done.finished[by_label[label]])
        wasted += max(0.0, end - max(began, failed_at))
    # how long siblings running at F went on (for polling members: until they saw cancelled)
    ran_on = [
        ends[label] - failed_at
        for label, began in starts.items()
        if label != "s0" and began <= failed_at and label in ends
    ]
    return {
        "ran_on_after_failure_s": ran_on,
        "starts_after_failure": sum(1 for at in starts.values() if at > failed_at),
        "siblings_started": len(starts) - 1,
        "settle_after_failure_s": max(done.finished.values()) - failed_at,
        "caller_knows_after_failure_s": done.finished[ids[0]] - failed_at,
        "wasted_sibling_s": wasted,
        "statuses": dict(done.statuses),
        "settled_after_failure_s": {
            label: round(done.finished[task_id] - failed_at, 4)
            for label, task_id in by_label.items()
        },
    }


def scenarios(app: Celery, pending: list[Any]) -> dict[str, Callable[[], list[str]]]:
    from celery_throttled import errgroup

    def plain_chord() -> list[str]:
        header = group(shape(app, "bench.sibling_plain"))
        result = chord(header)(app.signature("bench.chord_body"))
        pending.append(result)  # kept until the row ends (see p7)
        return [child.id for child in result.parent.results]

    def eg(**options: Any) -> Callable[[], list[str]]:
        poll = not options.get("terminate")

        def send() -> list[str]:
            members = shape(app, "bench.sibling", poll=poll)
            res = (errgroup(members, **options) | app.signature("bench.chord_body")).apply_async()
            return list(res.member_ids)

        return send

    return {
        "chord": plain_chord,
        "errgroup": eg(),
        "errgroup terminate": eg(terminate=True),
        "errgroup limit=4 terminate": eg(limit=4, terminate=True),
    }


def p7(bench: Bench, repeat: int) -> None:
    report = bench.report
    with bench.row("P7") as row:
        app = client_for(row)
        pending: list[Any] = []
        try:
            runs: dict[str, list[dict[str, Any]]] = {}
            for _ in range(repeat):
                for name, send in scenarios(app, pending).items():
                    runs.setdefault(name, []).append(measure(row, send))
        finally:
            # Celery subscribed to the chords' results: unsubscribe while Redis is still up
            for result in pending:
                for member in [result, *result.parent.results]:
                    app.backend.remove_pending_result(member)
            pending.clear()
            app.close()
    report.raw["P7"] = runs
    for name, results in runs.items():

        def figure(key: str, results: list[dict[str, Any]] = results) -> tuple[float, float]:
            values = [run[key] for run in results]
            return statistics.median(values), max(values)

        late_starts = max(run["starts_after_failure"] for run in results)
        settle, settle_worst = figure("settle_after_failure_s")
        wasted, wasted_worst = figure("wasted_sibling_s")
        started, _ = figure("siblings_started")
        is_errgroup = name.startswith("errgroup")
        ran_on = [t for run in results for t in run["ran_on_after_failure_s"]]
        report.add(
            Line(
                "P7",
                f"{name}: sibling starts after the failure (worst)",
                str(late_starts),
                "0" if is_errgroup else "",
                late_starts == 0 if is_errgroup else None,
            ),
            Line(
                "P7",
                f"{name}: failure -> every member settled, median / worst",
                f"{settle:.2f} / {settle_worst:.2f} s",
                f"<= {SETTLE_TARGET} s" if "terminate" in name else "",
                settle_worst <= SETTLE_TARGET if "terminate" in name else None,
            ),
            Line(
                "P7",
                f"{name}: wasted sibling-seconds after the failure, median / worst",
                f"{wasted:.2f} / {wasted_worst:.2f} s",
            ),
            Line("P7", f"{name}: siblings that started at all (median)", f"{started:.0f}"),
        )
        if name == "errgroup" and ran_on:  # members that poll current_context().cancelled
            seen = max(ran_on)
            report.add(
                Line(
                    "P7",
                    f"{name}: running siblings see cancelled after F, median / worst",
                    f"{statistics.median(ran_on) * 1000:.0f} / {seen * 1000:.0f} ms",
                    f"<= {SEEN_TARGET * 1000:.0f} ms",
                    seen <= SEEN_TARGET,
                )
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each scenario")
    parser.add_argument("--quick", action="store_true", help="one run of each scenario")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    parser.add_argument("--loglevel", default="warning", help="worker log level")
    add_keep_logs(parser)
    args = parser.parse_args(argv)
    with worker_logs("bench-errgroup", keep=args.keep_logs) as logs:
        return logs.outcome(run(args, logs.path))


def run(args: argparse.Namespace, logdir: Path) -> int:
    repeat = 1 if args.quick else args.repeat
    began = time.monotonic()
    with redis_for_bench() as url:
        bench = Bench(url, logdir, args.loglevel)
        env = environment(url)
        try:
            p7(bench, repeat)
        except Exception as exc:
            bench.report.errors.append(f"P7: {exc}")
            raise
        finally:
            gc.collect()  # results that die in cycles unsubscribe now, while Redis is up
            bench.close()
    report = bench.report
    print()
    print(table(report.lines))
    print(
        f"\n{repeat} run(s) of each scenario took {time.monotonic() - began:.0f} s on "
        f"{env['cpu_count']} CPUs"
    )
    for message in report.errors:
        print(f"ERROR: {message}")
    write_json(
        args.out,
        {
            "environment": env,
            "repeat": repeat,
            "table": [line.__dict__ for line in report.lines],
            "raw": report.raw,
            "errors": report.errors,
            "worker_logs": report.logs,
        },
    )
    print(f"results written to {args.out}")
    return 2 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
