"""Adaptive k: choose the number of SATs per draft from measured speed and acceptance.

Per decode iteration, plain decoding (k = 0) yields 1 token in one pass; SDSAT with k SATs
yields E[tokens | k] = 2 + sum_{i=1..k} prod_{j<=i} p_j in two passes, where p_j is the
conditional acceptance at offset j (draft j accepted given drafts 1..j-1 were); the fused
iteration (sdsat/decode/fused.py) yields 1 + the same sum, in one pass, summed up to the lookup
drafts' length when that is longer. The best k
maximises E[tokens | k] / time(iteration with k); drafting is chosen only when it beats the
plain step by a margin, so estimation noise falls back to plain decoding, never below it.

Both factors are measured online: iteration time as an EMA per (batch size, k), estimated
for unmeasured cells by linear interpolation over batch size and then over k; acceptance as
decayed counts per offset. The serving engine fills the time table before traffic
(:mod:`sdsat.decode.calibrate`), so no request pays for first measurements. All rows of a step
share its time, so the per-row rate ranks k for the whole batch.
"""

from __future__ import annotations

import random


def expected_tokens(accept: list[float], k: int, base: float = 2.0, reach: int | None = None) -> float:
    """E[new tokens per iteration | k]: 1 for plain decoding, base + sum_i prod_{j<=i} p_j for
    SDSAT over the first ``reach`` offsets (default k). base: tokens an iteration yields with no
    draft accepted, 2 for the two-step iteration (y0 and the bonus), 1 for the fused one."""
    if k == 0:
        return 1.0
    total, prod = base, 1.0
    for p in accept[: k if reach is None else reach]:
        prod *= p
        total += prod
    return total


def choose_k(
    step_seconds: dict[int, float], accept: list[float], margin: float = 0.0, base: float = 2.0, lookup: int = 0
) -> int:
    """The k with the most expected tokens per second; ties go to the smaller k.

    step_seconds: k -> time of one iteration with that k (k = 0: a plain step).
    accept: conditional acceptance per offset (k_max of them, or more with lookup drafts).
    margin: drafting (k > 0) must beat the plain step's rate by this fraction, else k = 0.
    base, lookup: the fused iteration yields 1 token with no draft accepted, and its lookup
    drafts reach ``lookup`` offsets whatever k is.
    """
    if not step_seconds:
        raise ValueError("choose_k needs at least one measured step time")
    rates = {k: expected_tokens(accept, k, base, max(k, lookup)) / t for k, t in step_seconds.items()}
    best = max(sorted(rates), key=lambda k: (rates[k], -k))
    if best and 0 in rates and rates[best] < rates[0] * (1 + margin):
        return 0
    return best


def interpolate(points: dict[int, float], x: int) -> float:
    """Piecewise-linear through measured points (x -> y), flat beyond the outermost ones."""
    if x in points:
        return points[x]
    xs = sorted(points)
    lower = [p for p in xs if p < x]
    upper = [p for p in xs if p > x]
    if lower and upper:
        lo, hi = lower[-1], upper[0]
        return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)
    return points[lower[-1] if lower else upper[0]]


def interpolate_times(measured: dict[int, float], k_max: int) -> dict[int, float]:
    """Estimate unmeasured SDSAT k (1..k_max) linearly between measured ones (flat beyond them).

    The plain step (k = 0) is a different kind of iteration and is never interpolated.
    """
    out = dict(measured)
    drafting = {k: t for k, t in measured.items() if k > 0}
    if drafting:
        for k in range(1, k_max + 1):
            out.setdefault(k, interpolate(drafting, k))
    return out


def bucket(batch_size: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, 9-16, ...: a k must be measured once in each bucket."""
    return max(0, (batch_size - 1).bit_length())


def calibration_sizes(max_batch_size: int) -> list[int]:
    """One batch size per bucket up to max_batch_size: 1, 2, 4, 8, ..., max_batch_size."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


class AdaptiveK:
    """Online estimates and the choice of k for the next greedy step."""

    def __init__(
        self,
        k_max: int,
        *,
        time_ema: float = 0.1,
        accept_decay: float = 0.98,
        explore_every: int = 64,
        margin: float = 0.1,
        prior: tuple[float, float] = (1.0, 2.0),
        seed: int = 0,
        fused: bool = False,
        lookup: int = 0,
    ):
        self.k_max = k_max
        self.base = 1.0 if fused else 2.0  # tokens a drafting iteration yields with nothing accepted
        self.lookup = lookup if fused else 0  # lookup drafts reach this many offsets at any k > 0
        depth = max(k_max, self.lookup)
        self.time_ema = time_ema  # weight of a new step time
        self.accept_decay = accept_decay  # per observed step
        self.explore_every = explore_every  # one exploring step (a neighbour of the best k) in this many
        self.margin = margin  # drafting must beat plain by this fraction of its rate
        self.step_seconds: dict[tuple[int, int], float] = {}  # (batch size, k) -> EMA of iteration time
        self.accepted = [prior[0]] * depth  # decayed count of drafts accepted at offset j
        self.reached = [prior[1]] * depth  # decayed count of drafts at offset j whose predecessors were accepted
        self.steps = 0
        self.rng = random.Random(seed)

    def acceptance(self) -> list[float]:
        """[max(k_max, lookup)]: conditional acceptance per offset."""
        return [a / r for a, r in zip(self.accepted, self.reached)]

    def times(self, batch_size: int) -> dict[int, float]:
        """k -> estimated iteration time at this batch size.

        A k measured at this size, or at sizes on both sides of it, is interpolated over batch
        size; other k are interpolated over k from those (a time measured only at smaller
        batches says little about a larger one). Without any such k (no calibration), the
        nearest measured sizes stand in.
        """
        by_k: dict[int, dict[int, float]] = {}
        for (size, k), t in self.step_seconds.items():
            by_k.setdefault(k, {})[size] = t

        def brackets(sizes: dict[int, float]) -> bool:
            return batch_size in sizes or min(sizes) < batch_size < max(sizes)

        here = {k: interpolate(s, batch_size) for k, s in by_k.items() if brackets(s)}
        near = {k: interpolate(s, batch_size) for k, s in by_k.items() if not brackets(s)}
        if any(k > 0 for k in here):
            out = interpolate_times(here, self.k_max)
            if 0 not in out and 0 in near:
                out[0] = near[0]
            return out
        return interpolate_times(near | here, self.k_max)

    def _measured_near(self, batch_size: int, k: int) -> bool:
        b = bucket(batch_size)
        return any(kk == k and bucket(size) == b for size, kk in self.step_seconds)

    def best(self, batch_size: int, times: dict[int, float] | None = None) -> int:
        """The k to exploit at this batch size (``times``: its estimates, if already made)."""
        times = self.times(batch_size) if times is None else times
        return choose_k(times, self.acceptance(), self.margin, self.base, self.lookup)

    def propose(self, batch_size: int) -> int:
        """k for the next step: measure the plain step, k = 1 and k_max once per batch-size
        bucket (unless calibrated), then exploit, and now and then try a neighbour of the
        best k so that both estimates stay fresh (less often where the neighbour is dearer)."""
        if self.k_max == 0:
            return 0
        for k in (0, 1, self.k_max):
            if not self._measured_near(batch_size, k):
                return k
        times = self.times(batch_size)
        best = self.best(batch_size, times)
        period = self._explore_period(times, best)
        if period and self.steps % period == period - 1:
            if best == 0 or (best < self.k_max and self.rng.random() < 0.5):
                return best + 1
            return best - 1
        return best

    def _explore_period(self, times: dict[int, float], best: int) -> int:
        """Steps between exploring steps: ``explore_every``, stretched by how much dearer the
        dearest neighbour of ``best`` is, so exploring costs about the same share of time
        whatever it tries (a fused step over 16 rows can cost several plain steps)."""
        if not self.explore_every:
            return 0
        neighbours = [times[k] for k in (best - 1, best + 1) if 0 <= k <= self.k_max and k in times]
        ratio = max(neighbours, default=0.0) / times[best] if times.get(best) else 1.0
        return max(self.explore_every, round(self.explore_every * ratio))

    def set_time(self, batch_size: int, k: int, step_s: float) -> None:
        """Set a measured iteration time outright (calibration)."""
        self.step_seconds[(batch_size, k)] = step_s

    def observe(self, batch_size: int, k: int, step_s: float, accepted: list[int]) -> None:
        """Record one step: its k, its time and the accepted drafts per row (none: a timing only)."""
        self.steps += 1
        key = (batch_size, k)
        old = self.step_seconds.get(key)
        self.step_seconds[key] = step_s if old is None else old + self.time_ema * (step_s - old)
        if k == 0 or not accepted:
            return
        self.accepted = [x * self.accept_decay for x in self.accepted]
        self.reached = [x * self.accept_decay for x in self.reached]
        for a in accepted:
            for j in range(min(a + 1, max(k, self.lookup))):  # offset j+1 was reached: drafts 1..j accepted
                self.reached[j] += 1
                if a > j:
                    self.accepted[j] += 1
