"""Prometheus metrics of a model replica, through Ray's metrics API.

Ray exports them on each node's metrics port (``ray start --metrics-export-port``) with the
Serve tags ``application``, ``deployment`` and ``replica`` added. Names (all prefixed ``sdsat_``
here; Ray adds ``ray_``): requests, generated tokens, drafted, accepted per offset, tau,
batch size, queue length, step time. A local copy of the counts is kept for ``snapshot()``
(tests and the ``stats`` handle method read it).
"""

from __future__ import annotations

import threading
from collections import Counter as Tally

from ray.serve import metrics

STEP_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
TAU_BUCKETS = [1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


class ServerMetrics:
    """Fed by the engine's ``on_step`` (per step) and by the server (per request)."""

    def __init__(self):
        self.requests = metrics.Counter(
            "sdsat_requests", "Finished requests by finish reason and decoding mode.", tag_keys=("finish_reason", "mode")
        )
        self.tokens = metrics.Counter("sdsat_generated_tokens", "Tokens generated.")
        self.drafted = metrics.Counter("sdsat_drafted_tokens", "Drafts offered for verification.")
        self.accepted = metrics.Counter("sdsat_accepted_tokens", "Accepted drafts, by draft offset.", tag_keys=("offset",))
        self.tau = metrics.Histogram("sdsat_tau", "Mean accepted length per finished request.", boundaries=TAU_BUCKETS)
        self.batch_size = metrics.Gauge("sdsat_batch_size", "Rows in the last decode step.")
        self.batch_hist = metrics.Histogram("sdsat_step_batch_size", "Rows per decode step.", boundaries=BATCH_BUCKETS)
        self.num_sat = metrics.Gauge("sdsat_num_sat", "k used by the last decode step (0: plain).")
        self.queue = metrics.Gauge("sdsat_queue_length", "Requests waiting to join the batch.")
        self.step_s = metrics.Histogram("sdsat_step_seconds", "Wall time of one decode step.", boundaries=STEP_BUCKETS)
        self._lock = threading.Lock()
        self._local = Tally()
        self._finish = Tally()
        self._batch_sizes = Tally()  # batch size -> steps
        self._accepted_per_offset: list[int] = []

    def on_step(self, step) -> None:
        """The engine's per-step callback (a ``StepMetrics``); may run on the engine's thread."""
        self.batch_size.set(step.batch_size)
        self.batch_hist.observe(step.batch_size)
        self.num_sat.set(step.k)
        self.queue.set(step.queue_length)
        self.step_s.observe(step.step_s)
        if step.new_tokens:
            self.tokens.inc(step.new_tokens)
        if step.drafted:
            self.drafted.inc(step.drafted)
        for offset, count in enumerate(step.accepted_per_offset, start=1):
            if count:
                self.accepted.inc(count, tags={"offset": str(offset)})
        with self._lock:
            self._local["steps"] += 1
            self._local["tokens"] += step.new_tokens
            self._local["drafted"] += step.drafted
            self._batch_sizes[step.batch_size] += 1
            self._local["max_queue_length"] = max(self._local["max_queue_length"], step.queue_length)
            grow = len(step.accepted_per_offset) - len(self._accepted_per_offset)
            self._accepted_per_offset += [0] * max(0, grow)
            for i, count in enumerate(step.accepted_per_offset):
                self._accepted_per_offset[i] += count

    def on_finish(self, finish_reason: str, stats: dict | None) -> None:
        """A request ended: "stop", "length", "cancelled" or "error"."""
        mode = (stats or {}).get("mode", "none")
        self.requests.inc(tags={"finish_reason": finish_reason, "mode": mode})
        if stats and stats.get("iterations"):
            self.tau.observe(stats.get("tau", 0.0))
        with self._lock:
            self._finish[finish_reason] += 1

    def snapshot(self) -> dict:
        with self._lock:
            out = dict(self._local)
            out["finished"] = dict(self._finish)
            out["steps_by_batch_size"] = dict(sorted(self._batch_sizes.items()))
            out["max_batch_size"] = max(self._batch_sizes, default=0)
            out["accepted_per_offset"] = list(self._accepted_per_offset)
        return out
