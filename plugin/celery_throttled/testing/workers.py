"""Real ``celery worker`` subprocesses of the application under test, one test's worth.

:class:`WorkerFactory` (the ``throttle_worker`` fixture) starts workers of the application named
as on Celery's command line (``-A``), each with the pool and concurrency the test asks for, and
points them at the test's Redis: broker, result backend and limiter, under a key prefix and a
default queue of the test's own, so tests never see each other's slots or messages. The
application's own settings stay as they are otherwise.

In the test process, :attr:`WorkerFactory.app` is a client of those workers: a ``Celery``
instance with the application's settings and the same overrides, made the current app while
the test runs, so ``task.delay()`` on the application's shared tasks (``@throttled_task`` is
one) goes to the test's workers. The application's own instance is not changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ThrottleWorker", "WorkerFactory", "stop_workers", "wait_answering", "wait_until"]

POOLS = ("prefork", "threads", "solo", "eventlet", "gevent")


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_answering(
    client: Any,
    name: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 60.0,
) -> None:
    """Return once the worker ``name`` answers a ping from ``client``; fail if it exits first.

    A worker logging at INFO says ``<name> ready.`` once its event loop runs, its remote
    control consumer already set up: from then on a ping is sent at once, its reply awaited up
    to 2 s. Before that (or at a quieter log level) a ping goes out every half second. So a
    worker is found ready within ~20 ms of saying so, not at the next ping.
    """
    line = f"{name} ready.".encode()
    said = False
    last_ping = float("-inf")

    def answered() -> bool:
        nonlocal said, last_ping
        if proc.poll() is not None:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise AssertionError(f"worker {name} exited:\n{text[-5000:]}")
        said = said or (log.exists() and line in log.read_bytes())
        now = time.monotonic()
        if not said and now - last_ping < 0.5:
            return False
        last_ping = now
        replies = client.control.ping(destination=[name], timeout=2.0 if said else 0.5)
        return any(name in reply for reply in replies)

    wait_until(answered, timeout, interval=0.02, what=f"worker {name} to answer ping")


def stop_workers(procs: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """Warm shutdown of every worker at once (SIGTERM to each, then one shared wait); a worker
    still running after ``timeout`` has its whole process group killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def settings_of(app: Any) -> dict[str, Any]:
    """The settings ``app`` was given (not Celery's defaults), under their lowercase names,
    whether they came as ``broker_url``, ``CELERY_BROKER_URL`` with a namespace (Django) or an
    old uppercase name."""
    from celery.app.defaults import _TO_NEW_KEY

    conf = app.conf
    conf.finalize()
    prefix = conf.prefix
    given = conf.without_defaults()
    out: dict[str, Any] = {}
    for key in list(given.keys()):
        if key.startswith("_"):
            continue
        if prefix:
            if not key.startswith(prefix):
                continue  # the rest of Django's settings
            name = key[len(prefix) :].lower()
        else:
            name = _TO_NEW_KEY.get(key, key) if key.isupper() else key
        out[name] = conf[name]
    return out


@dataclass
class ThrottleWorker:
    """One ``celery worker`` subprocess (its own process group) and its log file."""

    name: str
    pool: str
    concurrency: int
    log: Path
    proc: subprocess.Popen[bytes]

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """Warm shutdown (SIGTERM); the whole process group is killed after ``timeout``."""
        stop_workers([self.proc], timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # no pool child may outlive its worker
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@dataclass
class WorkerFactory:
    """Starts workers for one test; stops them all (and closes its client) at the end."""

    redis_url: str
    prefix: str
    tmp: Path
    started: list[ThrottleWorker] = field(default_factory=list)
    _app: Any = None
    _app_name: str | None = None
    _previous_app: Any = None

    def __call__(
        self,
        app: str,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: list[str] | None = None,
        conf: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        loglevel: str = "info",
        ready_timeout: float = 60.0,
    ) -> ThrottleWorker:
        """Start ``celery -A app worker -P pool -c concurrency`` and wait until it answers.

        ``app`` is what you give ``celery -A``. ``queues``: what the worker consumes (default:
        the test's own default queue). ``conf``: more settings laid over the application's, in
        the worker and in :attr:`app` (JSON-serializable values). ``env``: extra environment.
        """
        if pool not in POOLS:
            raise ValueError(
                f"throttle_worker: pool must be one of {', '.join(POOLS)}, got {pool!r}"
            )
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ValueError(
                f"throttle_worker: concurrency must be an int >= 1, got {concurrency!r}"
            )
        overrides = {**self.overrides(), **(conf or {})}
        client = self.client(app, overrides)
        name = f"w{len(self.started) + 1}-{self.prefix}@localhost"
        log = self.tmp / f"worker-{len(self.started) + 1}.log"
        environ = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            "PYTHONUNBUFFERED": "1",
            "CELERY_THROTTLED_PROBE_URL": self.redis_url,
            "CELERY_THROTTLED_PROBE_PREFIX": self.prefix,
            **(env or {}),
        }
        cmd = [
            sys.executable,
            "-m",
            "celery_throttled.testing.worker_main",
            json.dumps(overrides),
            "-A",
            app,
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-n",
            name,
            "-l",
            loglevel,
            "-Q",
            ",".join(queues or [self.prefix]),
            "--without-gossip",
            "--without-mingle",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        worker = ThrottleWorker(name, pool, concurrency, log, proc)
        self.started.append(worker)
        wait_answering(client, name, proc, log, ready_timeout)
        return worker

    def overrides(self) -> dict[str, Any]:
        """The settings every worker of this test and :attr:`app` get."""
        return {
            "broker_url": self.redis_url,
            "result_backend": self.redis_url,
            "throttle_redis_url": self.redis_url,
            "throttle_key_prefix": self.prefix,
            "task_default_queue": self.prefix,
            "broker_connection_retry_on_startup": True,
        }

    @property
    def app(self) -> Any:
        """The client app (after the first worker started): send tasks through it."""
        if self._app is None:
            raise RuntimeError("throttle_worker: start a worker first, then use .app")
        return self._app

    def client(self, app: str, overrides: dict[str, Any]) -> Any:
        if self._app is not None:
            if app != self._app_name:
                raise ValueError(
                    f"throttle_worker: this test's workers run {self._app_name!r}, not {app!r}"
                )
            return self._app
        from celery import Celery
        from celery._state import get_current_app
        from celery.app.utils import find_app

        own = find_app(app)
        client = Celery(own.main, set_as_current=False)
        client.conf.update({**settings_of(own), **overrides})
        self._previous_app = get_current_app()
        client.set_current()
        self._app, self._app_name = client, app
        return client

    def stop_all(self) -> None:
        stop_workers([worker.proc for worker in self.started])
        for worker in self.started:
            worker.stop()  # the pool children of a worker that was killed
        if self._app is not None:
            self._app.close()
            if self._previous_app is not None:
                self._previous_app.set_current()
            self._app = None
