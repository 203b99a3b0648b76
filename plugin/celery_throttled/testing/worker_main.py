"""``python -m celery_throttled.testing.worker_main CONF_JSON celery-args…``: a test's worker.

Imports the application named by ``-A`` the way ``celery`` does, lays the test's settings over
its own (``CONF_JSON``: broker, result backend, limiter Redis, key prefix, default queue), has
the worker record each throttled run for :class:`~celery_throttled.testing.ConcurrencyProbe`
(``CELERY_THROTTLED_PROBE_URL`` and ``CELERY_THROTTLED_PROBE_PREFIX``), then hands the rest of
the command line to Celery's own ``celery`` command.
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["main"]


def _app_name(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg in ("-A", "--app") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--app="):
            return arg.split("=", 1)[1]
    raise SystemExit("celery_throttled.testing.worker_main: no -A/--app given")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    conf = json.loads(args.pop(0))
    from celery.app.utils import find_app
    from celery.bin.celery import main as celery_main

    app = find_app(_app_name(args))
    app.conf.update(conf)
    url, prefix = (
        os.environ.get("CELERY_THROTTLED_PROBE_URL"),
        os.environ.get("CELERY_THROTTLED_PROBE_PREFIX"),
    )
    if url and prefix:
        from .probe import record_runs

        record_runs(url, prefix)
    sys.argv = ["celery", *args]
    celery_main()


if __name__ == "__main__":
    main()
