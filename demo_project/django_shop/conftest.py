"""The Django example's test setup: the project on the path and Django's settings module named
for each test (and only while it runs), as a Django project's own pytest configuration would
have them; the celery-throttled pytest plugin does the rest."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture(autouse=True)
def django_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """``DJANGO_SETTINGS_MODULE`` for this directory's tests, gone again after each."""
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "shop.settings")
