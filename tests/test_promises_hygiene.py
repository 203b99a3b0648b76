"""The suite's own hygiene: how it reads CI, and what it leaves behind."""

from __future__ import annotations

import re
import subprocess

import pytest

from .conftest import ROOT, in_ci


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1", "yes", "Yes", "on", "ON", " true "])
def test_ci_accepts_the_usual_truthy_spellings(monkeypatch: pytest.MonkeyPatch, value: str):
    """Given CI set as some CI systems spell it (CI=1, CI=True…), when a test asks whether it
    runs under CI, then the answer is yes. Catches: a check of ``CI == "true"`` only, which would
    skip the RabbitMQ, topology, browser and compose tests under such a CI instead of failing
    them."""
    monkeypatch.setenv("CI", value)
    assert in_ci()


@pytest.mark.parametrize("value", ["", "0", "false", "no", "off", "nope"])
def test_ci_is_off_for_other_values(monkeypatch: pytest.MonkeyPatch, value: str):
    """Given CI unset, empty or false-like, then the run is local (missing services skip).
    Catches: a check that treats any non-empty value as CI."""
    monkeypatch.setenv("CI", value)
    assert not in_ci()
    monkeypatch.delenv("CI")
    assert not in_ci()


def test_every_ci_check_goes_through_one_helper():
    """Given the sources, then none reads the CI variable except ``in_ci``. Catches: a new test
    that compares the variable to one spelling of its own."""
    reads = re.compile(r"""environ(\.get\(|\[)\s*["']CI["']""")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("tests", "benchmarks", "demo_project", "plugin")
        for path in (ROOT / folder).rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if reads.search(line)
    ]
    assert found == ["tests/conftest.py:" + str(_in_ci_line())], found


def _in_ci_line() -> int:
    lines = (ROOT / "tests" / "conftest.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def in_ci("))
    return next(i for i in range(start, len(lines)) if "environ" in lines[i]) + 1


def test_no_server_dump_is_tracked():
    """Given the repository, then no Redis dump or node file is committed. Catches: a server
    started with the checkout as its working directory, whose dump was then committed."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert [p for p in tracked if p.endswith((".rdb", ".aof")) or "nodes-" in p] == []
