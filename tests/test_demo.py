"""The demo, as a new user runs it: the README's first command (short workload), its dashboard in
a real browser, and Ctrl-C leaving no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, needs, wait_until

pytestmark = pytest.mark.timeout(400)


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    marker: str
    report: dict[str, Any]
    output: Path
    #: where the dashboard's screenshot goes: $DASHBOARD_SCREENSHOT, else the demo's test folder
    screenshot: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def leftovers(marker: str) -> list[int]:
    """Processes whose environment carries the demo run's marker."""
    found = []
    needle = f"CELERY_THROTTLED_DEMO_RUN={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """``run_demo.py --quick --stay``, with no REDIS_URL: it starts its own Redis."""
    tmp = tmp_path_factory.mktemp("demo")
    marker = uuid.uuid4().hex
    report = tmp / "report.json"
    output = tmp / "output.txt"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(CELERY_THROTTLED_DEMO_RUN=marker, COLUMNS="120")
    with output.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "demo_project/run_demo.py",
                "--quick",
                # 12 processes in all: the adaptive scenario's capacity steps to 12, and the cap
                # grows only on runs that start beside a whole cap of running bodies
                "--processes",
                "6",
                "--stay",
                "--report-json",
                str(report),
                "--logs",
                str(tmp / "logs"),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        wait_until(
            lambda: report.exists() or proc.poll() is not None, 300, what="the demo's report"
        )
        if proc.poll() is not None:
            pytest.fail(f"the demo exited ({proc.returncode}):\n{output.read_text()}")
        shot = Path(os.environ.get("DASHBOARD_SCREENSHOT") or tmp / "dashboard.png")
        yield Demo(proc, marker, json.loads(report.read_text()), output, shot)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in leftovers(marker):
            os.kill(pid, signal.SIGKILL)


def test_the_cap_protects_the_downstream(demo: Demo):
    report = demo.report
    # Then through the cap the downstream never saw more callers than it serves
    assert report["capped"]["violations"] == 0, report
    assert report["capped"]["ok"] == report["capped"]["tasks"] == 60
    assert report["capped"]["peak"] <= 5
    # And without it the same burst was turned away with 503s
    assert report["uncapped"]["violations"] > 0, report
    # And the errgroup cancelled its siblings; the timeouts and panics all yielded envelopes
    eg = report["errgroup"]
    assert eg["first_error"].startswith("[error]") and "supplier-4 is broken" in eg["first_error"]
    assert eg["cancelled_never_ran"] + eg["cancelled_while_running"] >= 1
    assert eg["ok"] + eg["cancelled_never_ran"] + eg["cancelled_while_running"] == 8
    assert report["timeouts"]["cleans-up"].startswith("ok")
    assert report["timeouts"]["runs-on"] == "[hard_timeout]"
    panics = report["panics"]
    assert panics["system_exit"] == "[error] builtins.SystemExit"
    assert panics["memory_error"] == "[error] builtins.MemoryError"
    assert panics["unserializable"].startswith("[unserializable]")
    assert panics["workers_alive_after"] == 2
    assert "the cap held: 0 violations through it" in demo.text()


def test_fair_shares_and_the_rate_protect_the_small_tenants_and_the_partner(demo: Demo):
    """Given the demo's report, Then with fair shares the small tenants were done sooner than
    behind one shared key, every sync succeeded, and through rate="20/s" the partner never
    answered 429 while the same calls without it were turned away: a family served first come
    first served, or a rate kept per worker, fails here."""
    report = demo.report
    shared, fair = report["tenants_shared"], report["tenants_fair"]
    assert shared["failed"] == fair["failed"] == 0, report
    assert fair["small_worst"] < shared["small_worst"], report
    rated, unrated = report["partner_rated"], report["partner_unthrottled"]
    assert rated["rate_violations"] == 0 and rated["ok"] == rated["tasks"] == 40, report
    assert unrated["rate_violations"] > 0, report
    assert "the rate held: 0 calls over the partner's rate through it" in demo.text()


def test_the_adaptive_cap_follows_the_downstreams_capacity(demo: Demo):
    """Given the demo's report, Then while the downstream's capacity stepped 5 -> 12 -> 3 the
    adaptive cap came within 25 % of each capacity during its step, every charge succeeded
    (a 503 retried), and the downstream answered 503 to few of them: a cap that never moves, or
    one that does not come down when the capacity does, fails here."""
    adaptive = demo.report["adaptive"]
    assert adaptive["failed"] == 0, adaptive
    assert [step["capacity"] for step in adaptive["steps"]] == [5, 12, 3], adaptive
    for step in adaptive["steps"]:
        assert step["within_25pct_after_s"] is not None, adaptive
    assert adaptive["steps"][-1]["cap_second_half_median"] <= 4, adaptive
    assert adaptive["503s"] <= 0.1 * adaptive["tasks"], adaptive


def chrome() -> Any:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        message = "Chromium and chromedriver are needed (Debian: chromium, chromium-driver)"
        needs(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1200,1100",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_dashboard_shows_the_cap_live_in_a_browser(demo: Demo):
    from selenium.webdriver.common.by import By

    browser = chrome()
    try:
        # Given the dashboard, open while the demo's workers run
        browser.get(demo.report["dashboard"])

        def number(selector: str) -> int:
            """The number the dashboard shows there (-1 while it shows none)."""
            text = browser.execute_script(  # read in one go: the page re-renders twice a second
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
                selector,
            ).strip()
            return int(text) if text.isdigit() else -1

        row = '#keys tr[data-key="payments-api"]'
        wait_until(lambda: number(f"{row} .done") == 60, 30, what="the payments-api row")
        served_before = number("#ds-served")
        # When the capped burst is started from its button
        browser.find_element(By.CSS_SELECTOR, 'button[data-scenario="burst-capped"]').click()
        running_seen: set[int] = set()
        served_seen: set[int] = set()
        shot = False

        def burst_done() -> bool:
            nonlocal shot
            running_seen.add(number(f"{row} .running"))
            served_seen.add(number("#ds-served"))
            if not shot and number(f"{row} .running") > 0 and number(f"{row} .waiting") > 0:
                demo.screenshot.parent.mkdir(parents=True, exist_ok=True)
                shot = browser.save_screenshot(str(demo.screenshot))
            return number(f"{row} .done") >= 360

        wait_until(burst_done, 120, interval=0.1, what="the burst to finish on the dashboard")
        # Then the numbers rendered and moved: slots in use up to the cap, calls served rising
        assert max(running_seen) >= 1 and max(running_seen) <= 5, running_seen
        assert len(served_seen) >= 3, served_seen
        assert number("#ds-served") >= served_before + 300
        assert number("#ds-violations") == 0
        assert number("#ds-capacity") == 5
        # And the adaptive key's cap is plotted against the downstream's capacity
        lines = "return document.querySelectorAll('#chart path').length"
        wait_until(lambda: browser.execute_script(lines) >= 2, 10, what="the two plotted lines")
        why = browser.find_element(By.CSS_SELECTOR, "#why").text
        assert why.startswith("cap ") and "last moved" in why, why
        recent = browser.find_element(By.CSS_SELECTOR, "#recent").text
        assert "burst-capped" in recent and "demo.charge" in recent
        assert shot and demo.screenshot.stat().st_size > 10_000
        print(f"dashboard screenshot: {demo.screenshot}")
    finally:
        browser.quit()


def test_ctrl_c_stops_everything(demo: Demo):
    # Given the demo still up (--stay), with its processes running
    assert len(leftovers(demo.marker)) >= 5  # redis, downstream, 2 workers (+ pools), web
    # When the user presses Ctrl-C
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(60) == 130
    # Then no process it started is left behind
    wait_until(lambda: not leftovers(demo.marker), 10, what="every demo process to exit")
