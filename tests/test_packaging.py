"""The version is written in one place and the changelog keeps up with it.

The distributions themselves are checked by ``noxfile.py`` (``nox -s dist smoke``), which
``.ci/run`` runs after the suite: building them here would leave build output in the checkout.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import celery_throttled

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_is_written_only_in_the_package():
    """Given pyproject.toml and the installed metadata, when the version is read from each,
    then pyproject declares it dynamic (read from ``celery_throttled.__version__``) and the
    metadata says the same as the package: a version written twice drifts."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "celery_throttled.__version__"
    }
    assert metadata.version("celery-throttled") == celery_throttled.__version__


def test_the_changelog_has_a_section_for_the_version():
    """Given the changelog, when the package's version is looked up in it, then it has a
    section of its own: a release without its entry is caught before it is built."""
    changelog = (ROOT / "CHANGELOG.md").read_text()
    sections = re.findall(r"^## \[([^\]]+)\]", changelog, re.MULTILINE)
    assert celery_throttled.__version__ in sections, sections
    assert "## Version policy" in changelog
