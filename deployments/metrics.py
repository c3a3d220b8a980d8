"""Prometheus metrics of a model replica, through Ray's metrics API.

Ray exports them on each node's metrics port (``ray start --metrics-export-port``) with the
Serve tags ``application``, ``deployment`` and ``replica`` added. Names (all prefixed ``sdsat_``
here; Ray adds ``ray_``): requests, generated tokens, tau, batch size, queue length, step time,
and, like vLLM's ``spec_decode_*`` counters, drafts verified and accepted per draft source
(``source``: "sat" or "lookup") and per position (``position``: 1 = the next token's draft):
``spec_decode_num_draft_tokens``, ``spec_decode_num_accepted_tokens`` and their ``_per_pos``
forms (acceptance rate at a position = accepted / verified there). A local copy of the counts
is kept for ``snapshot()`` (tests and the ``stats`` handle method read it).
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from copy import deepcopy

from ray.serve import metrics

from sdsat.decode.draft_counts import DraftCounts

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
        self.drafts = {
            kind: metrics.Counter(f"sdsat_spec_decode_num_{name}_tokens", f"Drafts {kind}, by draft source.", tag_keys=("source",))
            for kind, name in (("verified", "draft"), ("accepted", "accepted"))
        }
        self.drafts_per_pos = {
            kind: metrics.Counter(
                f"sdsat_spec_decode_num_{name}_tokens_per_pos",
                f"Drafts {kind}, by draft source and position (1: the next token's draft).",
                tag_keys=("source", "position"),
            )
            for kind, name in (("verified", "draft"), ("accepted", "accepted"))
        }
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
        self._drafts = DraftCounts()  # totals, per source and position

    def on_step(self, step) -> None:
        """The engine's per-step callback (a ``StepMetrics``); may run on the engine's thread."""
        self.batch_size.set(step.batch_size)
        self.batch_hist.observe(step.batch_size)
        self.num_sat.set(step.k)
        self.queue.set(step.queue_length)
        self.step_s.observe(step.step_s)
        if step.new_tokens:
            self.tokens.inc(step.new_tokens)
        for kind in ("verified", "accepted"):
            for source, counts in getattr(step.drafts, kind).items():
                if sum(counts):
                    self.drafts[kind].inc(sum(counts), tags={"source": source})
                for position, count in enumerate(counts, start=1):
                    if count:
                        self.drafts_per_pos[kind].inc(count, tags={"source": source, "position": str(position)})
        with self._lock:
            self._local["steps"] += 1
            self._local["tokens"] += step.new_tokens
            self._local["drafted"] += step.drafts.total("verified")
            self._local["accepted"] += step.drafts.total("accepted")
            self._batch_sizes[step.batch_size] += 1
            self._local["max_queue_length"] = max(self._local["max_queue_length"], step.queue_length)
            for kind in ("verified", "accepted"):
                for source, counts in getattr(step.drafts, kind).items():
                    for position, count in enumerate(counts, start=1):
                        self._drafts.add(kind, source, position, count)

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
            out["drafts"] = {"verified": deepcopy(self._drafts.verified), "accepted": deepcopy(self._drafts.accepted)}
        return out
