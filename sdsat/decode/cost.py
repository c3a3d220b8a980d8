"""What a decode pass costs: seconds as a function of batch rows and query tokens per row.

The hardware decides how much an extra query token costs: on a CPU with native bf16 a pass
over 6 tokens costs ~1.1x a 1-token pass, on an AVX2-only CPU in bf16 ~3x, on a GPU at small
batch ~1x. Nothing here is assumed. :func:`measure_curve` times passes over n query tokens
at batch 1 on real text (a few seconds); :class:`PassCost` keeps every (rows, q) pass it sees
as an exponential moving average, so the prediction follows the machine, the batch and the
growing context, and predicts a shape it has not seen from that curve at ``rows * q`` tokens,
scaled as the nearest seen shape was against the curve.
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

    def prior(self, rows: int, q: int) -> float:
        return interpolate(self.curve, rows * q)

    def predict(self, rows: int, q: int) -> float:
        """The observed time of this shape, else the curve scaled by the observed-to-curve
        ratio of the nearest observed shape: the same width at the nearest batch size (rows
        come and go, and a width's real cost at a batch size is what the batch-1 curve
        misses most), else the nearest batch size and width, and then (batch > 1) no less
        than linear in query tokens."""
        if (rows, q) in self.observed:
            return self.observed[(rows, q)]
        if not self.observed:
            return self.prior(rows, q)
        r, w = min(self.observed, key=lambda key: (key[1] != q, abs(key[0] - rows), abs(key[1] - q), key))
        scaled = self.prior(rows, q) * self.observed[(r, w)] / self.prior(r, w)
        if rows > 1 and w != q:
            # a width never seen at a batch size: the batch-1 curve says little about how
            # rows x q tokens cost there, so assume the worst (time linear in tokens) until
            # a pass of this width has been measured
            scaled = max(scaled, self.observed[(r, w)] * rows * q / (r * w))
        return scaled

    def observe(self, rows: int, q: int, seconds: float, weight: float | None = None) -> None:
        """Record a pass that took ``seconds`` (weight: of this observation, default ``ema``;
        a rarely seen shape can give its observations more)."""
        if seconds <= 0:
            return
        old = self.observed.get((rows, q))
        w = self.ema if weight is None else weight
        self.observed[(rows, q)] = seconds if old is None else old + w * (seconds - old)

    def ratios(self) -> dict[int, float]:
        """The measured curve relative to a 1-token pass: n -> t(n) / t(1)."""
        one = self.curve[1]
        return {n: t / one for n, t in sorted(self.curve.items())}
