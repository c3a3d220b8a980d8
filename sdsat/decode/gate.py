"""Whether SAT drafts pay beside prompt-lookup drafts, measured while decoding.

With ``lookup_first``, a fused pass runs the SAT draft block only where lookup finds no
drafts. Whether that block earns its cost depends on the hardware (an extra node in a pass
is nearly free on a GPU and costs ~3% of a pass on a 2-core CPU) and on the model's SAT
acceptance. The gate measures both. At each pass where the block would run (a *decision*)
it picks an arm: SAT (run the block) or LOOKUP (no block, as lookup decoding alone would).
A decision is scored with the pass after it, where the block's drafts are verified:

- its cost, the wall time of the two passes, kept as an average per arm;
- for SAT, its gain: the tokens the SAT drafts were accepted for beyond what the lookup
  drafts alone would have accepted in that pass (the caller counts them).

SAT is the better arm when its average gain is worth more than its extra time at the
current decoding rate: gain > rate x (time SAT - time LOOKUP). Content varies far more
than these two quantities do, so comparing them converges much faster than comparing the
arms' raw tokens per second. Both arms are tried in turn first (``warmup`` each), then the
better one is taken, the other every ``explore_every``-th decision, so the choice follows a
change of content or load. The gate chooses drafts only; the output is exactly plain
greedy either way.
"""

from __future__ import annotations

SAT, LOOKUP = "sat", "lookup"


class SatGate:
    """Two-armed choice of running the SAT draft block, by measured gain and cost."""

    def __init__(self, *, explore_every: int = 8, warmup: int = 6, smoothing: float = 0.05, rate_decay: float = 0.99):
        if explore_every < 2 or warmup < 1 or not 0.0 < smoothing <= 1.0 or not 0.0 < rate_decay <= 1.0:
            raise ValueError(
                "gate needs explore_every >= 2, warmup >= 1, 0 < smoothing <= 1 and 0 < rate_decay <= 1; "
                f"got {explore_every}, {warmup}, {smoothing}, {rate_decay}"
            )
        self.explore_every, self.warmup = explore_every, warmup
        self.smoothing, self.rate_decay = smoothing, rate_decay
        self.seconds: dict[str, float | None] = {SAT: None, LOOKUP: None}  # average wall time of a decision and its next pass
        self.gain: float | None = None  # average SAT-draft tokens a SAT decision gained
        self.counts = {SAT: 0, LOOKUP: 0}  # decisions scored per arm
        self.decisions = 0
        self._tokens = self._wall = 0.0  # decayed totals over every pass: the current rate
        self._open: tuple[str, float] | None = None  # (arm, seconds) of the decision pass

    def rate(self) -> float | None:
        """Tokens per second over recent passes (None: none yet)."""
        return self._tokens / self._wall if self._wall > 0 else None

    def best(self) -> str:
        """SAT when its gain is worth its extra time at the current rate."""
        rate, sat, lookup = self.rate(), self.seconds[SAT], self.seconds[LOOKUP]
        if rate is None or sat is None or lookup is None or self.gain is None:
            return SAT
        return SAT if self.gain > rate * (sat - lookup) else LOOKUP

    def choose(self) -> str:
        """The arm for this decision."""
        self.decisions += 1
        if min(self.counts.values()) < self.warmup:
            return SAT if self.counts[SAT] <= self.counts[LOOKUP] else LOOKUP
        best = self.best()
        if self.decisions % self.explore_every == 0:
            return LOOKUP if best == SAT else SAT
        return best

    def after_pass(self, arm: str | None, tokens: int, seconds: float, sat_gain: int = 0) -> None:
        """Record a pass: its tokens and wall seconds, ``arm`` if it was a decision (None: no
        choice was made in it), and sat_gain: tokens its SAT drafts were accepted for beyond
        what its lookup drafts alone would have given.

        A decision is scored with the pass after it; a decision pass right after another
        scores the earlier one and opens its own.
        """
        self._tokens = self._tokens * self.rate_decay + tokens
        self._wall = self._wall * self.rate_decay + seconds
        if self._open is not None:
            open_arm, open_seconds = self._open
            self.seconds[open_arm] = self._average(self.seconds[open_arm], open_seconds + seconds)
            if open_arm == SAT:
                self.gain = self._average(self.gain, sat_gain)
            self.counts[open_arm] += 1
            self._open = None
        if arm is not None:
            self._open = (arm, seconds)

    def reset_pending(self) -> None:
        """Drop an open decision (its next pass will not come: the batch emptied)."""
        self._open = None

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def snapshot(self) -> dict:
        return {
            "rate_tok_per_s": self.rate(),
            "sat_gain_tokens": self.gain,
            "sat_seconds": self.seconds[SAT],
            "lookup_seconds": self.seconds[LOOKUP],
            "decisions": self.decisions,
            "scored": dict(self.counts),
            "best": self.best(),
        }
