"""The pytest plugin for applications (``pytest_celery_throttled``, ``celery_throttled.testing``):
its fixtures against a real worker of an application configured for another Redis, its probe,
``assert_envelope``, and its manners: nothing imported until used, and beside Celery's and
pytest-celery's plugins."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from celery_throttled.envelope import Envelope, ErrorInfo
from celery_throttled.testing import ConcurrencyProbe, WorkerFactory, assert_envelope

from .conftest import ROOT

pytestmark = pytest.mark.timeout(240)
APP = "tests.apps.plugin_app"


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_the_probe_sees_the_cap_hold_and_real_overlap(
    throttle_worker: WorkerFactory, throttle_probe: ConcurrencyProbe, pool: str
):
    """Given a worker of an app whose settings name a Redis that does not exist, started by
    ``throttle_worker`` with room for four at once, when eight runs of a task capped at 2 and
    four of one capped at 4 are sent through ``throttle_worker.app``, then every envelope is
    ok, the probe's peak is 2 for the first key and 4 for the second (so the probe sees real
    overlap, and would see a cap that does not hold), and the limiter drains. Catches a worker
    left on the app's own settings, a probe that records nothing or a wrong key, or a cap that
    does not hold."""
    from tests.apps.plugin_app import capped, wide

    throttle_worker(APP, pool=pool, concurrency=4)
    results = [capped.delay(0.2) for _ in range(8)]
    for result in results:
        assert_envelope(result.get(timeout=60), ok=True, value=0.2, key="plugin-api")
    wides = [wide.delay(0.5) for _ in range(4)]
    for result in wides:
        assert_envelope(result.get(timeout=60), ok=True, key="plugin-wide")
    assert throttle_probe.peak("plugin-api") == 2
    assert throttle_probe.peak("plugin-wide") == 4
    throttle_probe.wait_drained("plugin-api")
    assert throttle_probe.running("plugin-api") == 0


def test_assert_envelope_reads_real_failures(throttle_worker: WorkerFactory):
    """Given a threads worker started by the plugin, when a task raises and another misses the
    deadline its caller gave, then ``assert_envelope`` accepts each for what it is and refuses
    it, naming the mismatch, for what it is not."""
    from tests.apps.plugin_app import capped, fails

    throttle_worker(APP, pool="threads", concurrency=2)
    failed = fails.delay("no such order").get(timeout=60)
    assert_envelope(
        failed,
        kind="error",
        error_type="builtins.LookupError",
        message="no such order",
        key="plugin-api",
    )
    late = capped.apply_async((5.0,), deadline=0.5).get(timeout=60)
    assert_envelope(late, ok=False, kind="deadline")
    with pytest.raises(AssertionError, match=r"kind is 'deadline', expected 'error'"):
        assert_envelope(late, kind="error")


def test_assert_envelope_lists_every_mismatch_and_reads_json():
    """Given an ok envelope in its JSON form, when it is checked as a failure of the wrong key,
    then one AssertionError lists each mismatch and shows the envelope; a bad kind is refused
    as a mistake in the test itself."""
    env = Envelope(ok=True, value=3, task_name="t.x", task_id="1", key="k")
    assert assert_envelope(env.to_json(), ok=True, value=3, key="k").value == 3
    with pytest.raises(AssertionError) as info:
        assert_envelope(env.to_json(), kind="deadline", key="other")
    text = str(info.value)
    assert "ok is True, expected False" in text and "kind is None, expected 'deadline'" in text
    assert "key is 'k', expected 'other'" in text and "envelope: ok, value 3" in text
    with pytest.raises(ValueError, match="kind must be one of"):
        assert_envelope(Envelope(ok=False, error=ErrorInfo("error", "x.Y", "m")), kind="oops")


def run_pytest(
    tmp_path: Path, files: dict[str, str], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTHONPATH")}
    environ.update(env or {})
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            *args,
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=200,
    )


def test_the_plugin_loads_by_itself_and_imports_nothing_until_used(tmp_path: Path):
    """Given a project that does not use the plugin (pytest-celery's plugin off, since it
    imports Celery), when its tests run, then the plugin is registered under its own name but
    neither Celery, Redis nor the package was imported: an installed package costs other
    projects' test runs nothing."""
    out = run_pytest(
        tmp_path,
        {
            "test_other.py": """
        import sys

        def test_nothing_heavy(request):
            assert request.config.pluginmanager.has_plugin("celery_throttled")
            assert "pytest_celery_throttled" in sys.modules
            heavy = [m for m in ("celery", "redis", "kombu", "celery_throttled")
                     if m in sys.modules]
            assert heavy == [], heavy
        """
        },
        "-p",
        "no:celery",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout
    off = run_pytest(tmp_path, {}, "-p", "no:celery", "-p", "no:celery_throttled", "--fixtures")
    assert "throttle_worker" not in off.stdout


def test_beside_celery_contrib_pytest(tmp_path: Path, redis_url: str):
    """Given a project that also uses ``celery.contrib.pytest`` (an in-process worker on the
    memory broker), when one test uses its fixtures and the plugin's together, then both apps
    serve their own tasks and each is current in turn, without one stealing the other's."""
    out = run_pytest(
        tmp_path,
        {
            "conftest.py": 'pytest_plugins = ["celery.contrib.pytest"]\n',
            "test_both.py": """
        from celery_throttled.testing import assert_envelope

        def test_both(celery_app, celery_worker, throttle_worker, throttle_probe):
            @celery_app.task
            def plain(x):
                return x * 2

            celery_worker.reload()
            assert plain.delay(21).get(timeout=10) == 42
            throttle_worker("tests.apps.plugin_app", pool="threads", concurrency=2)
            from tests.apps.plugin_app import capped

            assert_envelope(capped.delay(0.01).get(timeout=30), ok=True, value=0.01)
            assert plain.delay(2).get(timeout=10) == 4
            assert throttle_probe.peak("plugin-api") == 1
        """,
        },
        "-p",
        "no:celery",
        env={"REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout


def test_beside_pytest_celery(tmp_path: Path, redis_url: str):
    """Given pytest-celery's plugin loaded too (its container fixtures need Docker, which this
    machine may lack, so none of them is used), when the fixtures are listed and a test uses
    the plugin's, then both sets are offered and the test passes."""
    files = {
        "test_throttled.py": """
        from celery_throttled.testing import assert_envelope

        def test_capped(throttle_worker):
            throttle_worker("tests.apps.plugin_app", pool="solo", concurrency=1)
            from tests.apps.plugin_app import capped

            assert_envelope(capped.delay(0.01).get(timeout=30), ok=True, value=0.01)
        """
    }
    env = {"REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    listed = run_pytest(tmp_path, files, "--fixtures", env=env)
    assert "celery_setup" in listed.stdout and "throttle_worker" in listed.stdout, listed.stdout
    out = run_pytest(tmp_path, {}, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout
