"""The server's Prometheus metrics (``prometheus_client``, one registry per app).

Counters and the latency histogram are updated as requests are answered;
quota use and the count of replay records are read from the store when
``/metrics`` is scraped, which the server does in a worker thread (never on
the event loop). Keys appear only as key ids (:mod:`b2kd.provider.keys`).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _StoreCollector:
    """Quota use per key and replay records, read from the store at scrape time."""

    def __init__(self, usage: Callable[[], dict[str, tuple[int, int | None]]], records: Callable[[], int]):
        self.usage, self.records = usage, records

    def describe(self):
        return []  # collected at scrape time only

    def collect(self):
        used = GaugeMetricFamily("b2kd_quota_used", "Queries charged to an API key so far.", labels=["key"])
        limit = GaugeMetricFamily("b2kd_quota_limit", "The query quota of an API key.", labels=["key"])
        for kid, (spent, quota) in self.usage().items():
            used.add_metric([kid], spent)
            if quota is not None:
                limit.add_metric([kid], quota)
        yield used
        yield limit
        yield GaugeMetricFamily("b2kd_replay_records", "Answers kept for replay by request id.",
                                value=self.records())


class Metrics:
    def __init__(self, usage: Callable[[], dict[str, tuple[int, int | None]]], records: Callable[[], int]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("b2kd_http_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.queries = Counter("b2kd_queries", "Images answered and charged, by API key id.", ["key"],
                               registry=r)
        self.replayed = Counter("b2kd_replayed_queries",
                                "Images answered again from a stored answer, free of charge.", ["key"],
                                registry=r)
        self.request_bytes = Counter("b2kd_request_bytes",
                                     "Inference request body bytes received (as sent, compressed or not).",
                                     registry=r)
        self.response_bytes = Counter("b2kd_response_bytes", "Inference response body bytes sent.",
                                      registry=r)
        self.refusals = Counter("b2kd_refusals", "Requests refused, by reason.", ["reason"], registry=r)
        self.refunded = Counter("b2kd_refunded_queries", "Queries reserved, then refunded: the model failed.",
                                registry=r)
        self.log_failures = Counter("b2kd_access_log_failures",
                                    "Access-log records dropped or not written (requests are answered"
                                    " regardless).", registry=r)
        self.latency = Histogram("b2kd_infer_latency_seconds", "Inference request latency.",
                                 buckets=BUCKETS, registry=r)
        r.register(_StoreCollector(usage, records))

    def render(self) -> bytes:
        """The exposition text (reads the store: call it off the event loop)."""
        return generate_latest(self.registry)
