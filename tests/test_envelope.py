"""Every outcome becomes an envelope, and the worker keeps serving: the panic matrix."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from celery import Celery

from celery_throttled.envelope import Envelope, ErrorInfo
from celery_throttled.results import EnvelopeResult

from .conftest import ROOT, Workers, wait_until
from .probes import finished, leases, started

pytestmark = pytest.mark.timeout(300)

# case -> (kind, the dotted type it names, or None for ok)
EXPECTED: dict[str, tuple[str | None, str | None]] = {
    "ok": (None, None),
    "error": ("error", "builtins.ValueError"),
    "picky": ("error", "tests.apps.throttle_app.PickyError"),
    "chained": ("error", "builtins.RuntimeError"),
    "system_exit": ("error", "builtins.SystemExit"),
    "keyboard_interrupt": ("error", "builtins.KeyboardInterrupt"),
    "generator_exit": ("error", "builtins.GeneratorExit"),
    "memory_error": ("error", "builtins.MemoryError"),
    "recursion": ("error", "builtins.RecursionError"),
    "set": ("unserializable", "celery_throttled.errors.Unserializable"),
    "object": ("unserializable", "celery_throttled.errors.Unserializable"),
    "bytes": ("unserializable", "celery_throttled.errors.Unserializable"),
    "too_large": ("error", "celery_throttled.errors.ResultTooLarge"),
}
PROCESS_DEATH = ("os_exit", "sigkill", "segfault")


def envelope(client: Celery, result, timeout: float = 60) -> Envelope:
    env: Envelope = EnvelopeResult(result.id, app=client, backend=client.backend).get(
        timeout=timeout
    )
    return env


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_panic_matrix(workers: Workers, client: Celery, pool: str):
    # Given one worker of this pool
    worker = workers.start(pool=pool, concurrency=1 if pool == "solo" else 2)
    cases = list(EXPECTED) + (list(PROCESS_DEATH) if pool == "prefork" else [])
    table = []
    for case in cases:
        # When the task ends this way
        result = client.send_task("t.panic", (case,))
        env = envelope(client, result)
        # Then the caller gets an envelope of the right kind, Celery's state matches,
        kind, type_name = EXPECTED.get(case, ("worker_lost", None))
        if kind is None:
            assert env.ok and env.value == {"fine": True} and result.state == "SUCCESS"
        else:
            assert not env.ok, (case, env)
            assert env.error is not None
            assert env.error.kind == kind, (case, env.error)
            if type_name:
                assert env.error.type == type_name, (case, env.error)
            assert result.state == "FAILURE", (case, result.state)
        # and the worker still serves a normal task
        follow = client.send_task("t.panic", ("ok",))
        assert envelope(client, follow).ok, (case, worker.output()[-3000:])
        assert worker.alive()
        table.append((case, env.error.kind if env.error else "ok"))
    print(f"\npanic matrix on {pool}: " + ", ".join(f"{c}={k}" for c, k in table))


def test_envelope_details_and_chained_cause(workers: Workers, client: Celery, probe, prefix):
    """Given a threads worker, then an envelope carries the chained cause, the traceback, the
    key, worker, attempts and times, and a run that queued behind the cap says how long it
    waited: at least from when it was seen waiting until the first slot freed, at most from its
    sending to its start. Catches: a ``waited`` that is always 0 (or never set), and causes or
    details dropped from the envelope."""
    workers.start(pool="threads", concurrency=4)
    env = envelope(client, client.send_task("t.panic", ("chained",)))
    assert env.error is not None and env.error.message == "outer"
    assert env.error.cause is not None and env.error.cause.type == "builtins.KeyError"
    assert "RuntimeError: outer" in (env.error.traceback or "")
    unserializable = envelope(client, client.send_task("t.panic", ("set",)))
    assert unserializable.error is not None and "set" in unserializable.error.message
    ok = envelope(client, client.send_task("t.limited", ("x", 0.01)))
    assert ok.ok and ok.value == "x" and ok.key == "t.limited" and ok.attempts == 1
    assert ok.worker and ok.started_at and ok.finished_at and ok.runtime is not None
    assert ok.waited is not None and ok.waited >= 0
    with pytest.raises(Exception, match=r"\[error\] builtins.RuntimeError: outer"):
        env.unwrap()
    # A run that queued behind the cap of 2
    busy = [client.send_task("t.limited", (f"busy{i}", 1.0)) for i in range(2)]
    wait_until(lambda: len(started(probe, prefix, "limited")) == 3, 30, what="2 busy runs")
    sent = time.time()
    queued = client.send_task("t.limited", ("queued", 0.0))
    wait_until(
        lambda: leases(probe, prefix, "t.limited")["waiters"] == 1, 10, what="the third run to wait"
    )
    seen_waiting = time.time()
    waited = envelope(client, queued)
    assert all(envelope(client, r).ok for r in busy)
    starts, ends = dict(started(probe, prefix, "limited")), dict(finished(probe, prefix, "limited"))
    assert waited.ok and waited.waited is not None
    assert waited.waited >= min(ends["busy0"], ends["busy1"]) - seen_waiting, waited
    assert waited.waited <= starts["queued"] - sent, waited


def test_a_client_without_the_plugin_reads_results(
    workers: Workers, client: Celery, redis_url, prefix
):
    # Given an ok and a failed result stored by a worker
    workers.start(pool="threads", concurrency=2)
    ok = client.send_task("t.limited", ("plain-json", 0.0))
    bad = client.send_task("t.panic", ("error",))
    envelope(client, ok), envelope(client, bad)
    # When a process that never imports celery_throttled reads them
    script = f"""
import json, sys
from celery import Celery
app = Celery(broker={redis_url!r}, backend={redis_url!r})
ok = app.AsyncResult({ok.id!r}).get(timeout=10)
try:
    app.AsyncResult({bad.id!r}).get(timeout=10)
except Exception as exc:
    failure = [type(exc).__module__ + "." + type(exc).__name__, str(exc)]
assert "celery_throttled" not in sys.modules
print(json.dumps({{"ok": ok, "failure": failure}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT / "benchmarks",
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # Then the ok one is plain JSON data, the failed one an ordinary Celery failure with its story
    assert seen["ok"] == "plain-json"
    assert seen["failure"] == ["celery.exceptions.TaskError", "[error] builtins.ValueError: boom"]


def test_envelope_json_round_trip():
    inner = ErrorInfo("error", "builtins.KeyError", "'k'")
    env = Envelope(
        ok=False,
        error=ErrorInfo("soft_timeout", "x.Y", "late", "tb", inner),
        task_id="1",
        task_name="t",
        key="k",
        attempts=2,
        runtime=1.5,
        waited=0.25,
    )
    assert Envelope.from_json(json.loads(json.dumps(env.to_json()))) == env


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_whole_worker_death_is_reported_by_a_survivor(
    workers: Workers, client: Celery, probe, prefix, pool: str
):
    # Given a task running on a threads/solo worker, whose death takes the whole process
    doomed = workers.start(
        pool=pool, concurrency=1 if pool == "solo" else 2, name="doomed", LEASE_TTL=2
    )
    result = client.send_task("t.sleeper", ("doomed", 60))
    from .conftest import wait_until
    from .probes import started

    wait_until(lambda: started(probe, prefix, "sleepy"), 30, what="the task to start")
    # When that worker is SIGKILLed, and another one is running
    doomed.kill()
    workers.start(pool="threads", concurrency=2, name="survivor", LEASE_TTL=2)
    # Then the caller gets a worker_lost envelope once the dead worker's lease expires
    env = envelope(client, result, timeout=30)
    assert env.error is not None and env.error.kind == "worker_lost", env
    assert "presumed dead" in env.error.message
    assert result.state == "FAILURE"
    # And the slot is free again
    assert envelope(client, client.send_task("t.sleeper", ("after", 0))).ok
