"""Progress lines for long phases (self-distillation, training, export): done/total, rate, ETA,
at most one line every ``every_s`` seconds (and always the first and the last one)."""

from __future__ import annotations

import logging
import time


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``update(done)`` logs "<what>: done/total unit (pct) | rate unit/s | elapsed | ETA"."""

    def __init__(self, what: str, total: float, unit: str, log: logging.Logger, every_s: float = 10.0):
        self.what, self.total, self.unit, self.log, self.every_s = what, total, unit, log, every_s
        self.start = self.last = time.perf_counter()
        self.done = 0.0
        self.lines = 0

    def update(self, done: float, extra: str = "") -> None:
        self.done = done
        now = time.perf_counter()
        if self.lines and now - self.last < self.every_s and done < self.total:
            return
        self.last, self.lines = now, self.lines + 1
        self.log.info(self.line(now - self.start) + (f" | {extra}" if extra else ""))

    def line(self, elapsed: float) -> str:
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100 * self.done / self.total if self.total else 100.0
        eta_text = duration(eta) if eta != float("inf") else "?"
        return (f"{self.what}: {self.done:.4g}/{self.total:.4g} {self.unit} ({pct:.0f}%) | {rate:.3g} {self.unit}/s"
                f" | elapsed {duration(elapsed)} | eta {eta_text}")
