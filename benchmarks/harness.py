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
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

__all__ = ["WorkerLogs", "add_keep_logs", "chosen_rows", "run_rows", "worker_logs"]


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
