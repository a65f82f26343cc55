"""Inference statistics in Triton's shape (``GET /v2/models/NAME/stats``), kept by this process.

What tritonclient's ``get_inference_statistics`` reads: per model, the
inferences (images) and executions (model runs), and per phase a count and
total nanoseconds: ``success`` and ``fail`` (whole requests), ``queue``
(waiting for the model), ``compute_input`` (decoding), ``compute_infer``,
``compute_output`` (encoding), ``cache_hit`` (answers replayed from a
request id's record) and ``cache_miss``; ``batch_stats`` per batch size.
Refusals before decoding (key, rate, size) are not inferences and not counted.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
          "cache_hit", "cache_miss")
BATCH_PHASES = ("compute_input", "compute_infer", "compute_output")


def _duration() -> dict[str, int]:
    return {"count": 0, "ns": 0}


class InferenceStats:
    def __init__(self, name: str, version: str):
        self.name, self.version = name, version
        self._lock = threading.Lock()
        self._phases = {p: _duration() for p in PHASES}
        self._batches: dict[int, dict[str, dict[str, int]]] = defaultdict(
            lambda: {p: _duration() for p in BATCH_PHASES})
        self.inference_count = self.execution_count = 0
        self.last_inference_ms = 0

    def record(self, ok: bool, total_ns: int, images: int = 0, replayed: bool = False,
               phases: dict[str, int] | None = None) -> None:
        """One inference request: its outcome and the nanoseconds of each phase it went through."""
        phases = phases or {}
        with self._lock:
            self._add(self._phases["success" if ok else "fail"], total_ns)
            for phase, ns in phases.items():
                self._add(self._phases[phase], ns)
            if not ok:
                return
            self.inference_count += images
            self.last_inference_ms = int(time.time() * 1000)
            if replayed:
                self._add(self._phases["cache_hit"], total_ns)
                return
            self.execution_count += 1
            batch = self._batches[images]
            for phase in BATCH_PHASES:
                if phase in phases:
                    self._add(batch[phase], phases[phase])

    @staticmethod
    def _add(duration: dict[str, int], ns: int) -> None:
        duration["count"] += 1
        duration["ns"] += max(int(ns), 0)

    def model_stats(self) -> dict:
        with self._lock:
            return {
                "name": self.name, "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {p: dict(d) for p, d in self._phases.items()},
                "batch_stats": [{"batch_size": size, **{p: dict(d) for p, d in phases.items()}}
                                for size, phases in sorted(self._batches.items())],
                "memory_usage": [],
            }
