"""Checks what ``python -m build`` made: one wheel and one sdist, complete, of the right version.

    python .ci/check_dist.py DIST_DIR

The wheel must hold every Lua script and ``py.typed`` of ``plugin/celery_throttled``, the
license, the ``celery.commands`` and ``pytest11`` entry points, and metadata naming the version
written in ``celery_throttled/__init__.py``. The sdist must hold every file git tracks under the
folders it ships (the package, the tests, the demo, the docs), the README, the changelog and the
license, and nothing built or recorded (bytecode, benchmark results, a Redis dump).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "plugin" / "celery_throttled"
SHIPPED = ("plugin/", "tests/", "demo_project/", "docs/", "benchmarks/")
TOP = ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "MANIFEST.in")
NEVER = ("__pycache__", ".pyc", "benchmarks/results/", ".rdb", ".venv/")

failures: list[str] = []


def check(condition: object, message: str) -> None:
    print(f"{'ok' if condition else 'FAILED'}: {message}")
    if not condition:
        failures.append(message)


def version() -> str:
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return str(ast.literal_eval(node.value))
    raise SystemExit("no __version__ in celery_throttled/__init__.py")


def package_files(pattern: str) -> set[str]:
    return {f"celery_throttled/{p.relative_to(PACKAGE)}" for p in PACKAGE.rglob(pattern)}


def check_wheel(wheel: Path, ver: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"celery_throttled-{ver}.dist-info"
        metadata = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    lua = package_files("*.lua")
    check(lua and lua <= names, f"the wheel holds the {len(lua)} Lua scripts")
    check("celery_throttled/py.typed" in names, "the wheel holds py.typed")
    check(f"{info}/licenses/LICENSE" in names, "the wheel holds the license")
    modules = package_files("*.py") | {"pytest_celery_throttled.py"}
    check(modules <= names, f"the wheel holds the {len(modules)} modules")
    check(metadata["Version"] == ver, f"the wheel's version is {ver}")
    check(metadata["Requires-Python"] == ">=3.10", "the wheel requires Python 3.10+")
    check(metadata["License-Expression"] == "BSD-3-Clause", "the wheel names its license")
    check(
        metadata["Description-Content-Type"] == "text/markdown",
        "the long description is the README, as Markdown",
    )
    check(
        "[celery.commands]\nthrottle = celery_throttled.cli:throttle" in entry_points,
        "the wheel registers `celery throttle`",
    )
    check(
        "[pytest11]\ncelery_throttled = pytest_celery_throttled" in entry_points
        and "pytest_celery_throttled.py" in names,
        "the wheel registers its pytest plugin",
    )
    stray = sorted(n for n in names if any(bad in n for bad in NEVER) or n.startswith("tests/"))
    check(not stray, f"the wheel holds nothing built or of the tests {stray[:5]}")


def check_sdist(sdist: Path, ver: str) -> None:
    base = f"celery_throttled-{ver}/"
    with tarfile.open(sdist) as tf:
        names = {m.name.removeprefix(base) for m in tf.getmembers() if m.isfile()}
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    wanted = {p for p in tracked if p.startswith(SHIPPED) and not any(b in p for b in NEVER)}
    missing = sorted(wanted - names)
    check(not missing, f"the sdist holds every tracked file of {', '.join(SHIPPED)} {missing[:5]}")
    check(set(TOP) <= names, f"the sdist holds {', '.join(TOP)}")
    check(
        package_files("*.lua") <= {n.removeprefix("plugin/") for n in names},
        "the sdist holds the Lua scripts",
    )
    stray = sorted(n for n in names if any(bad in n for bad in NEVER))
    check(not stray, f"the sdist holds nothing built or recorded {stray[:5]}")


def main() -> None:
    dist = Path(sys.argv[1])
    ver = version()
    wheels = sorted(dist.glob("*.whl"))
    sdists = sorted(dist.glob("*.tar.gz"))
    check(len(wheels) == 1 and len(sdists) == 1, f"one wheel and one sdist in {dist}")
    if wheels:
        check(
            wheels[0].name == f"celery_throttled-{ver}-py3-none-any.whl",
            f"the wheel is pure Python, version {ver}",
        )
        check_wheel(wheels[0], ver)
    if sdists:
        check(sdists[0].name == f"celery_throttled-{ver}.tar.gz", f"the sdist is version {ver}")
        check_sdist(sdists[0], ver)
    if failures:
        raise SystemExit(f"{len(failures)} check(s) of the distributions failed")


if __name__ == "__main__":
    main()
