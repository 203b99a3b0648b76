"""The demo's web app (a Flask app factory): a live dashboard and buttons for the scenarios.

``python -m demo.web --port 8000`` (or any WSGI server on ``demo.web:create_app()``).

    GET  /                      the dashboard
    GET  /api/status            per key running / cap / waiting (an adaptive cap's bounds and
                                why it last moved), the downstream's counters, and the most
                                recent envelopes
    POST /api/scenarios/<name>  start a scenario (see :mod:`demo.scenarios`)
    GET  /health                200 "ok"
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from typing import Any

from flask import Flask, abort, jsonify, render_template

from celery_throttled import inspect
from celery_throttled.keys import ERRGROUP_KEY_PREFIX
from celery_throttled.results import envelope_from_meta

from .celery import app as celery_app
from .scenarios import SCENARIOS, recent_key
from .tasks import DOWNSTREAM_URL

__all__ = ["create_app"]


def create_app() -> Flask:
    web = Flask(__name__)

    @web.get("/")
    def dashboard() -> str:
        return render_template("dashboard.html", scenarios=list(SCENARIOS))

    @web.get("/health")
    def health() -> str:
        return "ok"

    @web.get("/api/status")
    def status() -> Any:
        return jsonify(keys=_keys(), downstream=_downstream(), recent=_recent())

    @web.post("/api/scenarios/<name>")
    def start(name: str) -> Any:
        if name not in SCENARIOS:
            abort(404, f"no scenario {name!r}; there are {', '.join(SCENARIOS)}")
        started = SCENARIOS[name]()
        return jsonify(scenario=name, sent=len(started.ids))

    return web


def _keys() -> list[dict[str, Any]]:
    return [
        {
            "key": status.key,
            "cap": status.cap,
            "running": status.running,
            "waiting": status.waiting,
            "done": status.done,
            "failed": status.failed,
            "source": status.cap_source,
            "bounds": None
            if status.adaptive_min is None
            else [status.adaptive_min, status.adaptive_max],
            "why": status.adaptive_why,
        }
        for status in inspect(celery_app)
        if not status.key.startswith(ERRGROUP_KEY_PREFIX)
    ]


def _downstream() -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{DOWNSTREAM_URL}/stats", timeout=2) as response:
            return dict(json.load(response))
    except OSError as exc:
        return {"error": str(exc)}


def _recent(count: int = 15, scan: int = 200) -> list[dict[str, Any]]:
    """The newest settled envelopes among the last ``scan`` tasks the scenarios sent."""
    backend = celery_app.backend
    entries = [json.loads(raw) for raw in backend.client.lrange(recent_key(), 0, scan - 1)]
    metas = backend.client.mget([backend.get_key_for_task(e["id"]) for e in entries] or ["-"])
    out = []
    for entry, raw in zip(entries, metas, strict=False):
        meta = json.loads(raw) if raw else {}
        if meta.get("status") not in ("SUCCESS", "FAILURE", "REVOKED"):
            continue
        envelope = envelope_from_meta(meta, entry["id"], None)
        if envelope.ok:
            detail = json.dumps(envelope.value)[:80]
        else:
            detail = envelope.error.message[:80] if envelope.error else ""
        out.append(
            {
                "id": entry["id"],
                "scenario": entry["scenario"],
                "state": meta["status"],
                "task": envelope.task_name,
                "ok": envelope.ok,
                "kind": None if envelope.error is None else envelope.error.kind,
                "detail": detail,
                "runtime": envelope.runtime,
            }
        )
        if len(out) == count:
            break
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The demo's web app and dashboard.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    from werkzeug.serving import run_simple

    print(f"dashboard on http://{args.host}:{args.port}", flush=True)
    run_simple(args.host, args.port, create_app(), threaded=True)


if __name__ == "__main__":
    main()
