"""The fragile downstream: an HTTP service that serves at most ``capacity`` callers at once.

A caller beyond that gets ``503`` and is counted as a *violation*: the crushed downstream made
visible. Its partner endpoint also has a rate limit (a token bucket of ``rate`` per second, at
most 5 at once): a call beyond it gets ``429``, counted as ``rate_violations``. Its capacity
changes while it runs (``POST /capacity?n=12``), as a real service's does with its load and its
deploys. ``python -m demo.downstream --port 8081 --capacity 5 --rate 20``.

    GET  /pay?ms=80&order=17   work for 80 ms, then 200 {"order": 17, "inside": 3}; 503 when full
    GET  /sync?ms=80&tenant=acme   the same, for a tenant's sync
    GET  /quote?ms=80&supplier=acme&fail=1   the same; fail=1 answers 500 (a broken supplier)
    GET  /notify?ms=10&n=4     the rate-limited partner: 429 when over its rate
    GET  /stats                {"capacity", "in_flight", "peak", "served", "violations", "errors",
                                "rate", "rate_violations"}
    POST /reset                zero every counter
    POST /capacity?n=12        serve at most 12 callers at once from now on
    GET  /health               200 "ok"
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

__all__ = ["Downstream", "serve"]

#: the partner's token bucket holds this many calls (its burst)
_BUCKET = 5.0


class Downstream:
    """The service's counters, shared by its request threads."""

    def __init__(self, capacity: int, rate: float = 20.0) -> None:
        self.capacity = capacity
        self.rate = rate
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.in_flight = self.peak = self.served = self.violations = self.errors = 0
            self.rate_violations = 0
            self._tokens, self._refilled = _BUCKET, time.monotonic()

    def within_rate(self) -> bool:
        """Take a token of the partner's rate, or count a rate violation (429)."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(_BUCKET, self._tokens + (now - self._refilled) * self.rate)
            self._refilled = now
            if self._tokens < 1:
                self.rate_violations += 1
                return False
            self._tokens -= 1
            return True

    def enter(self) -> int | None:
        """Take a place inside, or None (a violation) when ``capacity`` callers are in."""
        with self._lock:
            if self.in_flight >= self.capacity:
                self.violations += 1
                return None
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            return self.in_flight

    def set_capacity(self, capacity: int) -> None:
        """Serve at most ``capacity`` callers at once from now on (those inside stay)."""
        with self._lock:
            self.capacity = capacity

    def leave(self, ok: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            if ok:
                self.served += 1
            else:
                self.errors += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "capacity": self.capacity,
                "in_flight": self.in_flight,
                "peak": self.peak,
                "served": self.served,
                "violations": self.violations,
                "errors": self.errors,
                "rate": int(self.rate),
                "rate_violations": self.rate_violations,
            }


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/health":
            self._send(200, "ok")
        elif url.path == "/stats":
            self._send(200, self.server.downstream.stats())
        elif url.path in ("/pay", "/quote", "/sync"):
            self._work(url.path, query)
        elif url.path == "/notify":
            if not self.server.downstream.within_rate():
                self._send(429, {"error": f"over {self.server.downstream.rate:g} calls a second"})
                return
            self._work(url.path, query)
        else:
            self._send(404, {"error": f"no such path {url.path}"})

    def do_POST(self) -> None:
        url = urlparse(self.path)
        if url.path == "/reset":
            self.server.downstream.reset()
            self._send(200, self.server.downstream.stats())
        elif url.path == "/capacity":
            n = parse_qs(url.query).get("n", [""])[-1]
            if not n.isdigit():
                self._send(400, {"error": f"n must be a number of callers, got {n!r}"})
                return
            self.server.downstream.set_capacity(int(n))
            self._send(200, self.server.downstream.stats())
        else:
            self._send(404, {"error": "no such path"})

    def _work(self, path: str, query: dict[str, str]) -> None:
        downstream = self.server.downstream
        inside = downstream.enter()
        if inside is None:
            self._send(503, {"error": f"over capacity ({downstream.capacity} callers at once)"})
            return
        ok = query.get("fail") != "1"
        try:
            time.sleep(max(0, min(int(query.get("ms", "80")), 60_000)) / 1000)
        finally:
            downstream.leave(ok)
        if not ok:
            self._send(500, {"error": f"{query.get('supplier', 'supplier')} is broken"})
            return
        self._send(200, {**query, "inside": inside, "path": path})

    def _send(self, status: int, body: Any) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the demo has its own view
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], downstream: Downstream) -> None:
        self.downstream = downstream
        super().__init__(address, Handler)


def serve(host: str, port: int, capacity: int, rate: float = 20.0) -> Server:
    """Start serving in a background thread; returns the server (``shutdown()`` stops it)."""
    server = Server((host, port), Downstream(capacity, rate))
    threading.Thread(target=server.serve_forever, name="downstream", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The demo's fragile downstream service.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--capacity", type=int, default=5, help="callers served at once")
    parser.add_argument("--rate", type=float, default=20.0, help="/notify calls per second")
    args = parser.parse_args(argv)
    server = Server((args.host, args.port), Downstream(args.capacity, args.rate))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"downstream on http://{args.host}:{args.port} (capacity {args.capacity})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
