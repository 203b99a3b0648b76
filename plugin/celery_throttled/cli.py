"""``celery -A proj throttle …``: see and change the caps of a running cluster.

Registered through the ``celery.commands`` entry point, so it is a subcommand of Celery's own
CLI and finds the app the usual way (``-A``)::

    celery -A proj throttle status [KEY ...] [--json]
    celery -A proj throttle set KEY [N] [--rate 50/s]
    celery -A proj throttle reset KEY
    celery -A proj throttle top [--interval S] [--once]

Unknown keys, bad numbers and an unreachable Redis print one clear line and exit non-zero.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

import click
import redis

from .errors import ThrottleError
from .status import KeyStatus, inspect, reset_cap, set_cap, set_rate

__all__ = ["throttle"]


def _fail_cleanly(fun: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fun)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fun(*args, **kwargs)
        except ThrottleError as exc:
            raise click.ClickException(str(exc)) from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise click.ClickException(f"the limiter's Redis is unreachable: {exc}") from None

    return wrapper


@click.group(name="throttle")
@click.pass_context
def throttle(ctx: click.Context) -> None:
    """See and change celery-throttled's caps."""


def _app(ctx: click.Context) -> Any:
    obj = ctx.obj
    return obj.app if hasattr(obj, "app") else obj


@throttle.command()
@click.argument("keys", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
@click.pass_context
@_fail_cleanly
def status(ctx: click.Context, keys: tuple[str, ...], as_json: bool) -> None:
    """Per key: cap and its source, running, waiting, holders, outcomes, waits, rate,
    family, pending."""
    statuses = inspect(_app(ctx), list(keys) or None)
    if as_json:
        click.echo(json.dumps([s.to_json() for s in statuses], indent=2))
        return
    if not statuses:
        click.echo("no throttled key is in use")
        return
    click.echo(render(statuses))


def render(statuses: list[KeyStatus]) -> str:
    header = (
        "key",
        "cap",
        "source",
        "running",
        "waiting",
        "done",
        "failed",
        "wait p50",
        "wait p99",
        "rate",
        "pending",
    )
    rows = [header]
    for s in statuses:
        rows.append(
            (
                _label(s),
                _num(s.cap),
                s.cap_source,
                str(s.running),
                str(s.waiting),
                str(s.done),
                str(s.failed),
                _secs(s.wait_p50),
                _secs(s.wait_p99),
                _rate(s),
                _pending(s),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    for s in statuses:
        label = _label(s)
        if s.family is not None:
            lines.append(
                f"  {label}: family {s.family}, {s.family_running} running of its total "
                f"{_num(s.total)}"
            )
        if s.adaptive_cap is not None:
            lines.append(f"  {label}: {_adaptive(s)}")
        for worker, n in sorted(s.waiting_by_worker.items()):
            lines.append(f"  {label}: {n} waiting on {worker}")
        for h in s.holders:
            renewed = f"lease renewed {h.age:.1f}s ago"
            lines.append(f"  {label}: held by {h.task_id} on {h.worker} ({renewed})")
    return "\n".join(lines)


def _label(s: KeyStatus) -> str:
    """A key as the commands take it: KEY, or FAMILY/KEY for a key of a family."""
    return s.key if s.family is None else f"{s.family}/{s.key}"


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}ms"


def _rate(s: KeyStatus) -> str:
    """ "50/s (48 last s)": the rate, a star for a live override, and its use."""
    if s.rate is None:
        return "-"
    star = "*" if s.rate_source == "override" else ""
    return f"{s.rate}{star} ({s.rate_used} last s)"


def _adaptive(s: KeyStatus) -> str:
    """ "adaptive 1..64 at 3.74, moved 0.7s ago: overloaded at 5 running": its bounds, the value
    behind the cap, why and when it last moved, a pin and a pause."""
    text = f"adaptive {s.adaptive_min}..{s.adaptive_max} at {s.adaptive_cap:g}"
    if s.cap_source == "override":
        text += f" (pinned at {s.override} until reset)"
    if s.adaptive_why:
        text += f", moved {s.adaptive_moved or 0:.1f}s ago: {s.adaptive_why}"
    if s.paused:
        text += f"; admissions paused {s.paused:.1f}s more (slow down)"
    return text


def _cap(s: KeyStatus) -> str:
    """ "cap 3 (adaptive 1..64)", "cap 2 (override; declared 5)", "cap 5 (decorator)"."""
    if s.cap_source == "override":
        behind = f"adaptive {s.adaptive_cap:g}" if s.adaptive_cap is not None else "declared"
        if s.adaptive_cap is None:
            behind += f" {_num(s.declared)}"
        return f"cap {_num(s.cap)} (override; {behind})"
    if s.cap_source == "adaptive":
        return f"cap {_num(s.cap)} (adaptive {s.adaptive_min}..{s.adaptive_max})"
    return f"cap {_num(s.cap)} (decorator)"


def _pending(s: KeyStatus) -> str:
    return "-" if s.max_pending is None else f"{s.pending}/{s.max_pending}"


@throttle.command(name="set")
@click.argument("key")
@click.argument("cap", type=click.IntRange(min=1), required=False)
@click.option("--rate", help="A rate for the whole cluster: 50/s, 100/m, 5/h or a number per s.")
@click.pass_context
@_fail_cleanly
def set_command(ctx: click.Context, key: str, cap: int | None, rate: str | None) -> None:
    """Override KEY's cap with CAP (and/or its rate) across the cluster, until `reset`."""
    if cap is None and rate is None:
        raise click.UsageError("give a CAP, a --rate, or both")
    s = set_cap(_app(ctx), key, cap) if cap is not None else None
    if rate is not None:
        s = set_rate(_app(ctx), key, rate)
    assert s is not None
    rate_text = f", rate {_rate(s)}" if s.rate is not None else ""
    click.echo(f"{key}: {_cap(s)}{rate_text}, {s.running} running, {s.waiting} waiting")


@throttle.command()
@click.argument("key")
@click.pass_context
@_fail_cleanly
def reset(ctx: click.Context, key: str) -> None:
    """Back to the cap (and rate) KEY's tasks declare."""
    s = reset_cap(_app(ctx), key)
    rate_text = f", rate {_rate(s)}" if s.rate is not None else ""
    click.echo(f"{key}: {_cap(s)}{rate_text}, {s.running} running, {s.waiting} waiting")


@throttle.command()
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts and logs).")
@click.pass_context
@_fail_cleanly
def top(ctx: click.Context, interval: float, once: bool) -> None:
    """A live view of every key, most pressed first (Ctrl-C to leave)."""
    from rich.console import Console
    from rich.live import Live

    app = _app(ctx)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if once:
        console.print(frame(inspect(app)))
        return
    with Live(frame(inspect(app)), console=console, refresh_per_second=4, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(frame(inspect(app)))
        except KeyboardInterrupt:
            pass


def frame(statuses: list[KeyStatus]) -> Any:
    """One screen of ``top``: a table with a bar per key: running (█) and waiting (▒) against
    the cap, or against the demand when it exceeds the cap."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"celery throttle top  {time.strftime('%H:%M:%S')}", expand=False)
    for column in (
        "key",
        "cap",
        "running",
        "waiting",
        "load",
        "done",
        "failed",
        "rejected",
        "wait p99",
        "rate",
        "pending",
    ):
        table.add_column(column, justify="left" if column in ("key", "load") else "right")
    for s in statuses:
        width = 20
        scale = max(s.cap or 0, s.running + s.waiting, 1)  # the bar is the cap, or the demand
        used = min(width, round(width * s.running / scale))
        queued = min(width - used, round(width * s.waiting / scale))
        bar = Text("█" * used, style="green") + Text("▒" * queued, style="yellow")
        bar += Text("·" * (width - used - queued), style="dim")
        cap_text = f"{_num(s.cap)}{'*' if s.cap_source == 'override' else ''}"
        if s.adaptive_cap is not None:
            cap_text += f" ~{s.adaptive_min}..{s.adaptive_max}"
        table.add_row(
            _label(s),
            cap_text,
            str(s.running),
            str(s.waiting),
            bar,
            str(s.done),
            str(s.failed),
            str(s.rejected),
            _secs(s.wait_p99),
            _rate(s),
            _pending(s),
        )
    if not statuses:
        table.add_row("no throttled key is in use", *[""] * 10)
    table.caption = (
        "* a live override (celery throttle set); reset with celery throttle reset; "
        "~min..max: an adaptive cap and its bounds (status says why it last moved)"
    )
    return table


if __name__ == "__main__":  # pragma: no cover
    sys.exit(throttle())
