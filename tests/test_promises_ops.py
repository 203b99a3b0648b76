"""Operators' promises: ``celery throttle top --interval``, the override marker, and clear
errors for keys no task has used."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from celery import Celery

from celery_throttled.status import set_cap

from .conftest import PYTHONPATH, ROOT, Workers, holds_for, wait_until
from .test_cli import limiter_app, run

pytestmark = pytest.mark.timeout(180)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """``celery throttle top`` running in a pseudo-terminal, its screen output collected."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.apps.throttle_app", "throttle", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self._chunks.append(data)

    def text(self) -> str:
        return ANSI.sub("", b"".join(self._chunks).decode(errors="replace"))

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            os.close(self.master)


def cap_cell(text: str, key: str) -> list[str]:
    """Every cap cell ``top`` rendered for ``key``, in order."""
    return re.findall(rf"{re.escape(key)}\s*[│|]\s*(\d+\*?)\s*[│|]", text)


def test_top_refreshes_every_interval_and_marks_overrides(
    workers: Workers, client: Celery, prefix: str, redis_url: str, tmp_path: Path
):
    """Given two ``celery throttle top`` views, one refreshing every 0.3 s and one every 30 s,
    when a key's cap is overridden, then the fast view shows the new cap with the override
    marker (``7*``) within moments, the slow one still shows the old cap 2 s later, and both
    leave cleanly on Ctrl-C. Catches: ``--interval`` ignored (a fixed refresh), a view that never
    refreshes, and an override shown as if it were the declared cap."""
    workers.start(pool="threads", concurrency=2)
    assert client.send_task("t.limited", ("x", 0)).get(timeout=30) == "x"
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "TEST_PREFIX": prefix,
        "PYTHONPATH": PYTHONPATH,
        "COLUMNS": "200",
        "LINES": "40",
    }
    fast = Terminal(["top", "--interval", "0.3"], env)
    slow = Terminal(["top", "--interval", "30"], env)
    try:
        for view in (fast, slow):
            wait_until(
                lambda: "2" in cap_cell(view.text(), "t.limited"),  # noqa: B023
                30,
                what="top to show t.limited at its declared cap",
            )
        set_cap(limiter_app(redis_url, prefix), "t.limited", 7)
        wait_until(
            lambda: "7*" in cap_cell(fast.text(), "t.limited"),
            5,
            what="the fast view to show the override",
        )
        holds_for(
            lambda: "7*" not in cap_cell(slow.text(), "t.limited"),
            2.0,
            what="the slow view still showing its last refresh",
        )
    finally:
        codes = [view.interrupt() for view in (fast, slow)]
    assert codes == [0, 0]


def test_the_override_marker_and_errors_for_unknown_keys(
    workers: Workers, client: Celery, prefix: str, redis_url: str
):
    """Given a key in use, then ``top --once`` marks its cap with ``*`` while an override is set
    and not after ``reset``; and ``reset`` or ``status`` of a key no task has used fails in one
    clear line with a non-zero exit. Catches: an override not marked (or still marked after
    reset), and an unknown key reset silently (creating it) or failing with a traceback."""
    app = limiter_app(redis_url, prefix)
    workers.start(pool="threads", concurrency=2)
    assert client.send_task("t.limited", ("x", 0)).get(timeout=30) == "x"
    assert cap_cell(run(app, "top", "--once").output, "t.limited") == ["2"]
    assert run(app, "set", "t.limited", "7").exit_code == 0
    assert cap_cell(run(app, "top", "--once").output, "t.limited") == ["7*"]
    assert run(app, "reset", "t.limited").exit_code == 0
    assert cap_cell(run(app, "top", "--once").output, "t.limited") == ["2"]
    for command in (["reset", "nope"], ["status", "nope"]):
        out = run(app, *command)
        assert out.exit_code == 1, (command, out.output)
        assert out.output.strip() == "Error: unknown key 'nope': no throttled task has used it"
    assert run(app, "status", "--json").output.count('"key": "nope"') == 0
