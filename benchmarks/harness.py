"""What the benchmarks' command lines share: the workers' log folder, the rows to run.

The workers' logs go to a temporary folder, gone when the run ends well. Every benchmark that
starts workers runs inside :func:`worker_logs`::

    with worker_logs("bench-cap", keep=args.keep_logs) as logs:
        return logs.outcome(run(args, logs.path))

The folder is removed at the end unless the run failed (an exception, or a non-zero exit
status given to :meth:`WorkerLogs.outcome`) or ``--keep-logs`` was given; then it stays and its
path is printed. A folder named by the caller (``into``) is always kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

__all__ = [
    "WorkerLogs",
    "add_keep_logs",
    "chosen_rows",
    "merged",
    "rows_main",
    "run_rows",
    "worker_logs",
]


@dataclass
class WorkerLogs:
    """The log folder of one benchmark run."""

    path: Path
    keep: bool = False
    failed: bool = False

    def outcome(self, code: int) -> int:
        """Record the run's exit status (non-zero: it failed, the logs stay); return it."""
        self.failed = self.failed or code != 0
        return code


def add_keep_logs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the workers' logs (default: kept only when the run fails)",
    )


@contextlib.contextmanager
def worker_logs(name: str, keep: bool = False, into: Path | None = None) -> Iterator[WorkerLogs]:
    """A log folder for the run: ``into`` when given (created, always kept), else a new
    ``<name>-logs-*`` folder in the temp directory, removed at the end unless the run failed or
    ``keep`` is set."""
    if into is not None:
        into.mkdir(parents=True, exist_ok=True)
        logs = WorkerLogs(into, keep=True)
    else:
        logs = WorkerLogs(Path(tempfile.mkdtemp(prefix=f"{name}-logs-")), keep=keep)
    try:
        yield logs
    except BaseException:
        logs.failed = True
        raise
    finally:
        if logs.keep or logs.failed:
            print(f"worker logs kept in {logs.path}", flush=True)
        else:
            shutil.rmtree(logs.path, ignore_errors=True)


def chosen_rows(parser: argparse.ArgumentParser, text: str, known: Sequence[str]) -> list[str]:
    """The rows named in ``--rows`` (comma-separated, any case); an unknown one ends the run
    with a usage error."""
    rows = [r.strip().upper() for r in text.split(",") if r.strip()]
    if unknown := sorted(set(rows) - set(known)):
        parser.error(f"unknown rows {unknown}; choose from {', '.join(known)}")
    return rows


class Bench(Protocol):
    @property
    def report(self) -> Any: ...

    def close(self) -> None: ...


B = TypeVar("B", bound=Bench)
S = TypeVar("S")


def run_rows(
    bench: B, rows: Sequence[str], runners: Mapping[str, Callable[[B, S], None]], sizes: S
) -> None:
    """Run each row in turn; one that raises is recorded in the report's errors (its
    traceback printed) and the next one runs. The bench is closed at the end."""
    try:
        for tag in rows:
            print(f"running {tag} ...", flush=True)
            try:
                runners[tag](bench, sizes)
            except Exception as exc:
                bench.report.errors.append(f"{tag}: {exc}")
                traceback.print_exc()
    finally:
        bench.close()


def merged(path: Path, fresh: dict[str, Any], order: Sequence[str]) -> dict[str, Any]:
    """``fresh``, a run of some rows, laid over the results already at ``path``: the rows it ran
    replace their table lines and raw figures; the other rows keep the earlier run's, and that
    run's environment and rows stay under ``earlier``. The table follows ``order``."""
    if not path.exists():
        return fresh
    old = json.loads(path.read_text())
    ran = set(fresh["rows"])
    kept = [line for line in old.get("table", []) if line["row"] not in ran]
    table = sorted(kept + fresh["table"], key=lambda line: order.index(line["row"]))
    earlier = old.get("earlier") or {k: old.get(k) for k in ("environment", "rows", "elapsed_s")}
    return {
        **fresh,
        "rows": [row for row in order if row in ran or row in (old.get("rows") or [])],
        "table": table,
        "raw": {**old.get("raw", {}), **fresh["raw"]},
        "worker_logs": {
            **{k: v for k, v in old.get("worker_logs", {}).items() if not k.startswith(tuple(ran))},
            **fresh.get("worker_logs", {}),
        },
        "earlier": earlier,
        "rerun": sorted(ran, key=order.index),
    }


def rows_main(
    argv: Sequence[str] | None,
    doc: str,
    name: str,
    runners: Mapping[str, Callable[[Any, Any], None]],
    sizes: Callable[[bool], Any],
    results: Path,
    workers_per_row: int,
) -> int:
    """The command line of a benchmark made of rows (``bench_flow``, ``bench_adaptive``): each
    row a function of the bench and the sizes (``sizes(quick)``), run in turn on one Redis with
    the workers' logs in :func:`worker_logs`; prints the table and writes the JSON. Exit
    status: 0 even when a target is missed; 2 when a row could not be completed."""
    order = list(runners)
    parser = argparse.ArgumentParser(description=doc.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, for a smoke run")
    parser.add_argument("--rows", default=",".join(order), help="default: %(default)s")
    parser.add_argument("--out", type=Path, default=results, help="JSON output path")
    parser.add_argument("--loglevel", default="warning", help="worker log level")
    parser.add_argument("--merge", action="store_true", help="keep the other rows in --out")
    add_keep_logs(parser)
    args = parser.parse_args(argv)
    rows = chosen_rows(parser, args.rows, order)
    with worker_logs(name, keep=args.keep_logs) as logs:
        return logs.outcome(
            _run(args, rows, order, runners, sizes(args.quick), logs.path, workers_per_row)
        )


def _run(
    args: argparse.Namespace,
    rows: list[str],
    order: list[str],
    runners: Mapping[str, Callable[[Any, Any], None]],
    sizes: Any,
    logdir: Path,
    workers_per_row: int,
) -> int:
    from benchmarks.bench_cap import Bench, environment, redis_for_bench, table, write_json

    began = time.monotonic()
    with redis_for_bench() as url:
        bench = Bench(url, logdir, args.loglevel)
        env = environment(url)
        run_rows(bench, rows, runners, sizes)
    report = bench.report
    elapsed = time.monotonic() - began
    env["loadavg_at_end"] = os.getloadavg()
    env["workers_per_row"] = workers_per_row
    print()
    print(table(report.lines))
    print(
        f"\n{'quick' if args.quick else 'full'} run of {', '.join(rows)} took {elapsed:.0f} s "
        f"on {env['cpu_count']} CPUs (load {env['loadavg_at_start'][0]:.2f} at start)"
    )
    for message in report.errors:
        print(f"ERROR: {message}")
    fresh = {
        "environment": env,
        "quick": args.quick,
        "rows": rows,
        "elapsed_s": elapsed,
        "sizes": sizes.__dict__,
        "table": [line.__dict__ for line in report.lines],
        "raw": report.raw,
        "errors": report.errors,
        "worker_logs": report.logs,
    }
    write_json(args.out, merged(args.out, fresh, order) if args.merge else fresh)
    print(f"results written to {args.out}")
    return 2 if report.errors else 0
