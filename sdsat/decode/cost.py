"""What a decode pass costs: seconds as a function of batch rows and query tokens per row.

The hardware decides how much an extra query token costs: on a CPU with native bf16 a pass
over 6 tokens costs ~1.1x a 1-token pass, on an AVX2-only CPU in bf16 ~3x, on a GPU at small
batch ~1x. Nothing here is assumed. :func:`measure_curve` times passes over n query tokens
at batch 1 on real text (a few seconds); :class:`PassCost` keeps every (rows, q) pass it sees
as an exponential moving average, so the prediction follows the machine, the batch and the
growing context. A shape not seen yet is predicted from a measured pass at the same batch
size (else the nearest one), times what its width costs against a plain pass (:meth:`PassCost.ratio`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CURVE_POINTS = (1, 2, 4, 6, 8, 11, 16, 24, 32)  # query tokens measured at start-up


def interpolate(points: dict[int, float], x: float) -> float:
    """Piecewise-linear through (x -> y) points; flat below the smallest, extrapolated with
    the last segment's slope (never falling) beyond the largest."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    for lo, hi in zip(xs, xs[1:]):
        if x <= hi:
            return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)
    if len(xs) == 1:
        return points[xs[0]] * x / xs[0]
    lo, hi = xs[-2], xs[-1]
    slope = max(0.0, (points[hi] - points[lo]) / (hi - lo))
    return points[hi] + slope * (x - hi)


@dataclass
class PassCost:
    """Predicted seconds of a pass over ``rows`` rows of ``q`` query tokens each."""

    curve: dict[int, float]  # query tokens at batch 1 -> seconds (start-up measurement)
    ema: float = 0.2  # weight of a new observation
    observed: dict[tuple[int, int], float] = field(default_factory=dict)  # (rows, q) -> EMA seconds

    def __post_init__(self):
        if not self.curve or 1 not in self.curve or any(t <= 0 for t in self.curve.values()):
            raise ValueError(f"a pass-cost curve needs a positive time at 1 query token, got {self.curve}")
        self._by_rows: dict[int, dict[int, float]] = {}  # rows -> {q: seconds}, the same EMAs
        for (rows, q), seconds in self.observed.items():
            self._by_rows.setdefault(rows, {})[q] = seconds
        self._memo: dict[tuple[int, int], float] = {}  # predictions since the last observation

    def prior(self, rows: int, q: int) -> float:
        return interpolate(self.curve, rows * q)

    def predict(self, rows: int, q: int) -> float:
        """The observed time of this shape; else a measured time at this batch size (at the
        nearest width) or at the nearest batch size (its plain pass first, rescaled by the
        curve), times :meth:`ratio`, what a width costs against a plain pass."""
        key = (rows, q)
        if key in self.observed:
            return self.observed[key]
        if key not in self._memo:
            self._memo[key] = self._unseen(rows, q)
        return self._memo[key]

    def _unseen(self, rows: int, q: int) -> float:
        here = self._by_rows.get(rows)
        if not self.observed or (rows == 1 and not here):
            return self.prior(rows, q)  # the curve is the batch-1 measurement
        if here:
            w = min(here, key=lambda w: (abs(w - q), w))
            return here[w] * self.ratio(rows, q) / self.ratio(rows, w)
        r = min(self._by_rows, key=lambda r: (abs(r - rows), r))
        near = self._by_rows[r]
        w = 1 if 1 in near else min(near, key=lambda w: (abs(w - q), w))
        plain = near[w] / self.ratio(r, w) * self.prior(rows, 1) / self.prior(r, 1)
        return plain * self.ratio(rows, q)

    def ratio(self, rows: int, q: int) -> float:
        """Predicted t(rows, q) / t(rows, 1). At batch 1 the start-up curve says. At batch > 1
        the ratios measured at the nearest batch size at least this large (a larger batch pays
        relatively more per extra token: the safe side), interpolated between measured widths
        and linear in query tokens beyond the widest; with no such batch size, linear in query
        tokens until a pass of that width is measured. The batch-1 curve is no guide there:
        at batch 16 a 2-token pass measured 1.7-2x a plain one where the curve at 32 vs 16
        tokens said 1.4-1.6x, and the rows of a closed batch that draft finish early, so a
        drafting pass that pays for itself can still make the batch slower (0.83x plain in
        ``jobs/bench.py`` at batch 16 on a 2-core avx512_bf16 CPU when the curve was trusted).
        Exploration measures what a width really costs before the decoder relies on it."""
        if q == 1:
            return 1.0
        if rows == 1:
            return interpolate(self.curve, q) / self.curve[1]
        larger = [r for r, widths in self._by_rows.items() if r >= rows and 1 in widths]
        if not larger:
            return float(q)
        return self._measured_ratio(min(larger), q)

    def _measured_ratio(self, rows: int, q: int) -> float:
        widths = self._by_rows[rows]
        points = {w: t / widths[1] for w, t in widths.items()}
        top = max(points)
        if q <= top:
            return interpolate(points, q)
        return points[top] * q / top

    def observe(self, rows: int, q: int, seconds: float, weight: float | None = None) -> None:
        """Record a pass that took ``seconds`` (weight: of this observation, default ``ema``;
        a rarely seen shape can give its observations more)."""
        if seconds <= 0:
            return
        old = self.observed.get((rows, q))
        w = self.ema if weight is None else weight
        new = seconds if old is None else old + w * (seconds - old)
        self.observed[(rows, q)] = new
        self._by_rows.setdefault(rows, {})[q] = new
        self._memo.clear()

    def ratios(self) -> dict[int, float]:
        """The measured curve relative to a 1-token pass: n -> t(n) / t(1)."""
        one = self.curve[1]
        return {n: t / one for n, t in sorted(self.curve.items())}
