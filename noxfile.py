"""The distributions, the installed wheel, the supported Pythons and the docs (``.ci/run`` runs
them all; the full test suite runs on one Python, from the checkout).

    nox -s dist          build the sdist and the wheel (into $CELERY_THROTTLED_DIST, else a
                         temporary folder), check them and their metadata (twine --strict)
    nox -s smoke         install the wheel into a fresh virtualenv and run .ci/wheel_smoke.py
                         from outside the checkout: a real worker, `celery throttle status`
    nox -s subset        the wheel on every supported Python this machine has: import, eager
                         mode, a cap and an envelope against real workers, the pytest plugin
    nox -s docs          the documentation site, warnings as errors, built outside the checkout

Interpreters are found on PATH and in pyenv's versions (``$PYENV_ROOT``, else ``~/.pyenv``);
none is downloaded. Give ``--envdir`` a folder outside the checkout to keep ``.nox`` out of it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
#: the real subset of the suite every supported Python runs (the full suite runs on one)
SUBSET = [
    "tests/test_api.py::test_eager_mode_runs_inline",
    "tests/test_cap.py::test_cap_holds_across_two_workers[prefork+prefork]",
    "tests/test_envelope.py::test_envelope_details_and_chained_cause",
    "tests/test_testing_plugin.py::test_the_probe_sees_the_cap_hold_and_real_overlap[threads]",
]
#: what the subset needs beside the package (the suite's fixtures use only these)
SUBSET_DEPS = ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5"]

nox.options.sessions = ["dist", "smoke", "subset", "docs"]
nox.options.download_python = "never"
nox.options.reuse_venv = "no"


def _pyenv_bins() -> list[str]:
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    found = []
    for version in PYTHONS:
        for candidate in sorted(root.glob(f"{version}.*"), reverse=True):
            if (candidate / "bin" / f"python{version}").is_file():
                found.append(str(candidate / "bin"))
                break
    return found


# pyenv's shims answer only for the selected version: put the real interpreters first
os.environ["PATH"] = os.pathsep.join([*_pyenv_bins(), os.environ.get("PATH", "")])


def _dist_dir() -> Path:
    named = os.environ.get("CELERY_THROTTLED_DIST")
    if named:
        return Path(named)
    made = Path(tempfile.mkdtemp(prefix="celery-throttled-dist-"))
    os.environ["CELERY_THROTTLED_DIST"] = str(made)
    atexit.register(shutil.rmtree, made, ignore_errors=True)
    return made


def _wheel(session: nox.Session) -> Path:
    """The wheel `dist` built in this run (or an earlier one into the same folder)."""
    wheels = sorted(_dist_dir().glob("celery_throttled-*.whl"))
    if not wheels:
        dist(session)
        wheels = sorted(_dist_dir().glob("celery_throttled-*.whl"))
    return wheels[-1]


def _redis_server() -> str:
    from celery_throttled.testing.redis import redis_server_binary  # as the suite's fixtures

    return redis_server_binary()


@nox.session(python=False)
def dist(session: nox.Session) -> None:
    """Build the sdist, then the wheel from it; check both and their metadata."""
    out = _dist_dir()
    for old in out.glob("celery_throttled-*"):
        old.unlink()
    session.run(sys.executable, "-m", "build", "--outdir", str(out), str(ROOT), external=True)
    files = [str(p) for p in sorted(out.glob("celery_throttled-*"))]
    session.run(sys.executable, "-m", "twine", "check", "--strict", *files, external=True)
    session.run(sys.executable, str(ROOT / ".ci" / "check_dist.py"), str(out), external=True)


@nox.session
def smoke(session: nox.Session) -> None:
    """The wheel in a fresh virtualenv, run from outside the checkout."""
    session.install(str(_wheel(session)))
    work = Path(session.create_tmp()) / "smoke"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    shutil.copy(ROOT / ".ci" / "wheel_smoke.py", work)
    session.chdir(work)
    session.run(
        "python",
        "-I",
        "wheel_smoke.py",
        "--checkout",
        str(ROOT),
        "--redis-server",
        _redis_server(),
        env={"PYTHONPATH": ""},
    )


@nox.session(python=PYTHONS)
def subset(session: nox.Session) -> None:
    """Import, eager mode, one cap and one envelope test against real workers, per Python."""
    session.install(str(_wheel(session)), *SUBSET_DEPS)
    session.chdir(ROOT)
    session.run(
        "python",
        "-c",
        "import sys, celery_throttled as c; "
        f"assert '%d.%d' % sys.version_info[:2] == {session.python!r}, sys.version; "
        "assert c.__file__.startswith(sys.prefix), c.__file__; "
        "print('celery_throttled', c.__version__, 'from', c.__file__, 'on', sys.version)",
    )
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET, *session.posargs)


@nox.session(python=False)
def docs(session: nox.Session) -> None:
    """The site, warnings as errors: a broken link or include, a page missing from the table of
    contents, a docstring autodoc cannot read."""
    site = Path(session.create_tmp()) / "site"
    shutil.rmtree(site, ignore_errors=True)
    session.run(
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-q",
        "-b",
        "html",
        "-d",
        str(site / ".doctrees"),
        str(ROOT / "docs"),
        str(site),
        external=True,
    )
    print(f"site built in {site}")
