"""Start-up measurement of the pass-cost curve (:mod:`sdsat.decode.cost`) on real text.

One row holding a prompt of real prose and code (it does not repeat itself) takes fused
passes of n = 1, 2, 4, ... query tokens (its lookup drafts, padded with filler), in rounds:
a warm-up round (the first call of a shape costs more), then timed rounds until
``budget_s`` is spent, mid-round if need be. The median time per n is the curve; a shape
the budget left untimed keeps its warm-up time (an overestimate: the safe side), so the
measurement takes about ``budget_s``, or one warm-up round where that is longer. Each round also
times a batch of ``rows`` rows (the same text at different offsets) at a few widths: at
batch > 1 the batch-1 curve says little about a width's cost, and the cost model otherwise
assumes the worst there until exploration has measured it (:meth:`PassCost.ratio`).
:class:`Calibration` runs one pass per call, so a serving engine can serve requests between
its passes.
"""

from __future__ import annotations

import statistics
import time

from .batch import Batch, Sequence
from .cost import CURVE_POINTS, PassCost
from .scheduler import Plan, RowPlan, Scheduler

TEXT = """The committee met on Tuesday to review the budget for the coming year. Most members agreed
that the library needed new shelves, longer opening hours and a better heating system, but
they disagreed about how to pay for it.

def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    total, out = 0.0, []
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out

In the end they voted to raise the annual fee by five percent and to ask the city council
for a grant covering the rest."""


class _FixedWidth:
    """A stand-in scheduler that runs every pass at one width (the row's lookup nodes, then filler)."""

    def __init__(self):
        self.width = 1

    def plan(self, rows) -> Plan:
        return Plan([RowPlan(0, min(self.width - 1, len(r.lookup.tokens)), 0) for r in rows], self.width)

    def observe(self, *args) -> None:
        pass

    def skipping(self, seq_ids) -> bool:
        return False

    def planned(self, *args) -> None:
        pass

    def forget(self, seq_id: int) -> None:
        pass


BATCH_ROWS = 4  # rows of the batch measured beside the batch-1 curve
BATCH_POINTS = (1, 2, 4, 8)  # its widths


class Calibration:
    """Measures the curve one pass per :meth:`step`; :attr:`done` when finished."""

    def __init__(
        self, loaded, *, points=CURVE_POINTS, budget_s: float = 8.0, pad_id: int = 0, max_prompt: int = 160,
        rows: int = BATCH_ROWS, row_points=BATCH_POINTS,
    ):
        self.points = sorted({1, *points})
        self.budget_s = budget_s
        shapes = [(1, n) for n in self.points] + ([(rows, n) for n in sorted({1, *row_points})] if rows > 1 else [])
        self.shapes = shapes
        self.samples: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
        self.first: dict[tuple[int, int], float] = {}  # the warm-up round's time per shape
        self.fixed = _FixedWidth()
        banned = loaded.sat.unique_ids if loaded.sat else []
        widest = max(n for _, n in shapes)
        new_tokens = 4 * len(shapes) * widest  # more than any run of rounds emits
        text = _prompt(loaded, new_tokens, max_prompt)
        self.batches = {}
        for r in sorted({r for r, _ in shapes}):
            batch = Batch(loaded.model, None, banned, pad_id, scheduler=self.fixed)
            # different offsets into the text: rows of different lengths, as in a real batch
            batch.add([Sequence(text[i * 7 :] or text, new_tokens) for i in range(r)])
            self.batches[r] = batch
        self.queue = list(shapes)  # warm-up round
        self.round = 0
        self.spent = 0.0
        self.done = False

    def step(self) -> None:
        """One measured pass."""
        if self.done:
            return
        rows, n = self.queue.pop(0)
        self.fixed.width = n
        batch = self.batches[rows]
        start = time.perf_counter()
        batch.scheduled_step([], lookup=max(self.points))
        seconds = time.perf_counter() - start
        self.spent += seconds
        if self.round:
            self.samples[(rows, n)].append(seconds)
        else:
            self.first[(rows, n)] = seconds
        if not self.queue:
            self.round += 1
            exhausted = any(len(b) < r for r, b in self.batches.items())
            if self.spent >= self.budget_s or exhausted or self.round > 8:
                self.done = True
            else:
                self.queue = list(self.shapes)
        elif self.round and self.spent >= self.budget_s:
            self.done = True  # out of time mid-round: shapes not timed again keep their warm-up time

    def _times(self) -> dict[tuple[int, int], float]:
        """Per shape, the median of its timed passes, else its warm-up pass (a first call costs
        more, so a budget spent before a second round errs towards dear wide passes)."""
        out = {shape: statistics.median(t) for shape, t in self.samples.items() if t}
        for shape, seconds in self.first.items():
            out.setdefault(shape, seconds)
        return out

    def curve(self) -> dict[int, float]:
        """Batch 1: query tokens -> seconds."""
        return {n: t for (r, n), t in self._times().items() if r == 1}

    def batched(self) -> dict[tuple[int, int], float]:
        """The batch of ``rows`` rows: (rows, width) -> seconds."""
        return {shape: t for shape, t in self._times().items() if shape[0] > 1}

    def cost(self) -> PassCost:
        """A cost model starting from these measurements."""
        return PassCost(self.curve(), observed=self.batched())


def measure(loaded, **kwargs) -> Calibration:
    """Time passes of each shape on real text, within about ``budget_s`` seconds."""
    calibration = Calibration(loaded, **kwargs)
    while not calibration.done:
        calibration.step()
    return calibration


def measure_curve(loaded, **kwargs) -> dict[int, float]:
    """The batch-1 curve alone."""
    return measure(loaded, rows=1, **kwargs).curve()


def measured_scheduler(loaded, **kwargs) -> Scheduler:
    """A scheduler whose cost model starts from this machine's measured passes."""
    return Scheduler(measure(loaded, **kwargs).cost())


def _prompt(loaded, new_tokens: int, max_prompt: int) -> list[int]:
    from .generate import max_prompt_len

    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    sat = set(loaded.sat.sat_ids) if loaded.sat else set()
    ids = [t for t in loaded.tokenizer.encode(TEXT) if t < vocab and t not in sat] or [1]
    fit = max_prompt_len(loaded, new_tokens)
    length = max_prompt if fit is None else max(1, min(max_prompt, fit))
    return ids[:length]
