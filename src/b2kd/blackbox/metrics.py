"""The server's counters and latency histogram, in Prometheus text format (no client library)."""

from __future__ import annotations

import threading
from collections import defaultdict

COUNTERS = {
    "b2kd_http_requests_total": "HTTP requests answered, by endpoint and status.",
    "b2kd_queries_total": "Images answered and charged, by API key id.",
    "b2kd_replayed_queries_total": "Images answered again from a stored answer, free of charge.",
    "b2kd_request_bytes_total": "Inference request body bytes received.",
    "b2kd_response_bytes_total": "Inference response body bytes sent.",
    "b2kd_refusals_total": "Inference requests refused, by reason.",
}
GAUGES = {
    "b2kd_quota_used": "Queries charged to an API key so far.",
    "b2kd_quota_limit": "The query quota of an API key.",
}
LATENCY = "b2kd_infer_latency_seconds"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, int]] = defaultdict(lambda: defaultdict(int))
        self._buckets = [0] * len(BUCKETS)
        self._latency_sum = 0.0
        self._latency_count = 0

    def inc(self, name: str, value: int = 1, **labels: str) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            for i, edge in enumerate(BUCKETS):
                if seconds <= edge:
                    self._buckets[i] += 1
            self._latency_sum += seconds
            self._latency_count += 1

    def render(self, usage: dict[str, tuple[int, int | None]]) -> str:
        """The exposition text; ``usage`` is (used, quota) per key id, read at scrape time."""
        lines: list[str] = []
        with self._lock:
            for name, help_text in COUNTERS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
                samples = self._counters.get(name) or {(): 0}
                lines += [f"{name}{_labels(lab)} {val}" for lab, val in sorted(samples.items())]
            lines += [f"# HELP {LATENCY} Inference request latency.", f"# TYPE {LATENCY} histogram"]
            for edge, count in zip(BUCKETS, self._buckets):
                lines.append(f'{LATENCY}_bucket{{le="{edge:g}"}} {count}')
            lines += [f'{LATENCY}_bucket{{le="+Inf"}} {self._latency_count}',
                      f"{LATENCY}_sum {self._latency_sum:.6f}", f"{LATENCY}_count {self._latency_count}"]
        gauges = {
            "b2kd_quota_used": {kid: used for kid, (used, _) in usage.items()},
            "b2kd_quota_limit": {kid: quota for kid, (_, quota) in usage.items() if quota is not None},
        }
        for name, values in gauges.items():
            lines += [f"# HELP {name} {GAUGES[name]}", f"# TYPE {name} gauge"]
            lines += [f'{name}{{key="{kid}"}} {v}' for kid, v in values.items()]
        return "\n".join(lines) + "\n"
