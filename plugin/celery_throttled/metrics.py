"""Prometheus metrics of one worker, per key: served when ``throttle_metrics_port`` is set.

========================================  =========  ==============================================
name                                      type       meaning (labels: ``key``)
========================================  =========  ==============================================
``celery_throttle_cap``                   gauge      the cap the key's tasks declare (+Inf: a
                                                     rate or a family's total, no cap); for an
                                                     adaptive key, its cap now (or its pin)
``celery_throttle_cap_min``               gauge      an adaptive key's bounds
``celery_throttle_cap_max``
``celery_throttle_cap_moved``             gauge      when an adaptive key's cap last moved (epoch
                                                     s), label ``reason``: overloaded, slow down,
                                                     latency, held, probing, grew, slow start,
                                                     bounds
``celery_throttle_rate``                  gauge      the rate the key's tasks declare, per second
                                                     (its use: rate of started_total)
``celery_throttle_running``               gauge      tasks of the key running on this worker
``celery_throttle_waiting``               gauge      tasks of the key waiting for a slot here
``celery_throttle_started_total``         counter    runs admitted (a slot granted)
``celery_throttle_finished_total``        counter    runs ended, label ``outcome``: done, failed,
                                                     retried
``celery_throttle_rejected_total``        counter    tasks refused by their wait policy
``celery_throttle_wait_seconds``          histogram  time from arrival to a slot
``celery_throttle_run_seconds``           histogram  time from admission to release
========================================  =========  ==============================================

Each worker serves its own numbers (sum them across workers for the cluster); ``celery throttle
status`` reads the cluster-wide view from Redis. A key of a family is labelled ``FAMILY/KEY``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from .admission import UNCAPPED
from .errors import ConfigurationError
from .keys import Family, split_key

__all__ = ["Metrics"]

logger = logging.getLogger(__name__)

_REASONS = (
    "overloaded",
    "slow down",
    "latency",
    "held",
    "probing",
    "grew",
    "slow start",
    "bounds",
)
_ADAPTIVE_FIELDS = ("acap", "amin", "amax", "awhy", "amoved", "override")
_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def label(key: str) -> str:
    """A key as ``celery throttle`` names it: KEY, or FAMILY/KEY."""
    family, name = split_key(key)
    return name if family is None else f"{family}/{name}"


class Metrics:
    def __init__(
        self,
        counts: Callable[[], dict[str, tuple[int, int, int]]],
        rates: Callable[[], dict[str, float]] = dict,
        redis: Any = None,
        prefix: str = "",
    ) -> None:
        """``counts`` and ``rates`` come from the worker's lines; ``redis`` (a limiter client)
        and ``prefix`` let a scrape read the adaptive keys' caps, which move in Redis."""
        try:
            import prometheus_client as prom
            from prometheus_client.core import GaugeMetricFamily
        except ImportError:  # pragma: no cover - exercised by installs without the extra
            raise ConfigurationError(
                "throttle_metrics_port is set but prometheus-client is not installed: "
                "pip install 'celery-throttled[metrics]'"
            ) from None
        self.registry = prom.CollectorRegistry(auto_describe=True)
        self._started = prom.Counter(
            "celery_throttle_started", "Runs admitted.", ["key"], registry=self.registry
        )
        self._finished = prom.Counter(
            "celery_throttle_finished",
            "Runs ended, by outcome.",
            ["key", "outcome"],
            registry=self.registry,
        )
        self._rejected = prom.Counter(
            "celery_throttle_rejected",
            "Tasks refused by their wait policy.",
            ["key"],
            registry=self.registry,
        )
        self._wait = prom.Histogram(
            "celery_throttle_wait_seconds",
            "Time from arrival to a slot.",
            ["key"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._run = prom.Histogram(
            "celery_throttle_run_seconds",
            "Time from admission to release.",
            ["key"],
            buckets=_BUCKETS,
            registry=self.registry,
        )

        class _Gauges:
            def collect(self) -> Iterator[Any]:
                cap = GaugeMetricFamily("celery_throttle_cap", "The key's cap.", labels=["key"])
                running = GaugeMetricFamily(
                    "celery_throttle_running", "Running on this worker.", labels=["key"]
                )
                waiting = GaugeMetricFamily(
                    "celery_throttle_waiting", "Waiting for a slot here.", labels=["key"]
                )
                rate = GaugeMetricFamily(
                    "celery_throttle_rate", "The key's rate, per second.", labels=["key"]
                )
                low = GaugeMetricFamily(
                    "celery_throttle_cap_min", "An adaptive cap's bound.", labels=["key"]
                )
                high = GaugeMetricFamily(
                    "celery_throttle_cap_max", "An adaptive cap's bound.", labels=["key"]
                )
                moved = GaugeMetricFamily(
                    "celery_throttle_cap_moved",
                    "When an adaptive cap last moved (epoch s), and why.",
                    labels=["key", "reason"],
                )
                known = counts()
                live = adaptive_caps(redis, prefix, sorted(known))
                for key, (c, r, w) in sorted(known.items()):
                    state = live.get(key)
                    if state is not None:
                        c = state[0]
                        low.add_metric([label(key)], state[1])
                        high.add_metric([label(key)], state[2])
                        moved.add_metric([label(key), state[3]], state[4])
                    cap.add_metric([label(key)], float("inf") if c >= UNCAPPED else c)
                    running.add_metric([label(key)], r)
                    waiting.add_metric([label(key)], w)
                for key, per_second in sorted(rates().items()):
                    rate.add_metric([label(key)], per_second)
                yield from (cap, running, waiting, rate, low, high, moved)

        self.registry.register(_Gauges())
        self._prom = prom

    def serve(self, port: int, addr: str) -> None:
        self._prom.start_http_server(port, addr=addr, registry=self.registry)
        logger.info("celery-throttled: metrics on http://%s:%d/metrics", addr, port)

    def admitted(self, key: str, waited: float) -> None:
        key = label(key)
        self._started.labels(key).inc()
        self._wait.labels(key).observe(waited)

    def ended(self, key: str, outcome: str, runtime: float | None) -> None:
        key = label(key)
        if outcome == "rejected":
            self._rejected.labels(key).inc()
            return
        if outcome:
            self._finished.labels(key, outcome).inc()
        if runtime is not None:
            self._run.labels(key).observe(runtime)


def adaptive_caps(
    client: Any, prefix: str, keys: list[str]
) -> dict[str, tuple[int, int, int, str, float]]:
    """Per adaptive key among ``keys``: its cap now (the pin, if any), min, max, the reason of
    its last move and when it was (epoch s). Empty without a client, or when Redis fails."""
    if client is None or not keys:
        return {}
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(Family.of(prefix, key).meta, *_ADAPTIVE_FIELDS)
    try:
        replies = pipe.execute()
    except Exception as exc:  # a scrape must not fail for it
        logger.debug("celery-throttled: adaptive caps not read for metrics: %s", exc)
        return {}
    out = {}
    for key, reply in zip(keys, replies, strict=True):
        acap, low, high, why, at, pin = (_text(v) for v in reply)
        if acap is None or low is None or high is None:
            continue
        reason = next((r for r in _REASONS if (why or "").startswith(r)), "other")
        cap = int(pin) if pin is not None else int(float(acap))
        out[key] = (cap, int(low), int(high), reason, int(at or 0) / 1000)
    return out


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
