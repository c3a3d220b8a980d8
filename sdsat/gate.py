"""Whether SAT drafts pay beside prompt-lookup drafts, measured while decoding.

With ``lookup_first``, a fused pass runs the SAT draft block only where lookup finds no
drafts. Whether that block earns its cost depends on the hardware (an extra node in a pass
is nearly free on a GPU and costs ~3% of a pass on a 2-core CPU) and on the model's SAT
acceptance. The gate measures it: at each pass where the block would run (a *decision*), it
picks an arm, SAT (run the block) or LOOKUP (no block, as lookup decoding alone would), and
scores the arm by the tokens and wall time of that pass and the next one, where the block's
drafts are verified. Each arm's rate is decayed tokens over decayed seconds; the faster arm
is taken, the other one every ``explore_every``-th decision (and in turn until both have
``warmup`` decisions), so the choice follows a change of content or load. The gate chooses
drafts only; the output is exactly plain greedy either way.
"""

from __future__ import annotations

SAT, LOOKUP = "sat", "lookup"


class SatGate:
    """Two-armed choice of running the SAT draft block, by measured tokens per second."""

    def __init__(self, *, explore_every: int = 8, warmup: int = 6, decay: float = 0.97):
        if explore_every < 2 or warmup < 1 or not 0.0 < decay <= 1.0:
            raise ValueError(f"gate needs explore_every >= 2, warmup >= 1, 0 < decay <= 1; got {explore_every}, {warmup}, {decay}")
        self.explore_every, self.warmup, self.decay = explore_every, warmup, decay
        self.tokens = {SAT: 0.0, LOOKUP: 0.0}  # decayed tokens per arm
        self.seconds = {SAT: 0.0, LOOKUP: 0.0}  # decayed wall seconds per arm
        self.counts = {SAT: 0, LOOKUP: 0}  # decisions scored per arm
        self.decisions = 0
        self._open: tuple[str, int, float] | None = None  # (arm, tokens, seconds) of the decision pass

    def rate(self, arm: str) -> float | None:
        """Tokens per second of this arm (None: not measured)."""
        return self.tokens[arm] / self.seconds[arm] if self.seconds[arm] > 0 else None

    def best(self) -> str:
        sat, lookup = self.rate(SAT), self.rate(LOOKUP)
        if sat is None or lookup is None:
            return SAT if sat is None else LOOKUP
        return SAT if sat > lookup else LOOKUP

    def choose(self) -> str:
        """The arm for this decision."""
        self.decisions += 1
        if min(self.counts.values()) < self.warmup:
            return SAT if self.counts[SAT] <= self.counts[LOOKUP] else LOOKUP
        best = self.best()
        if self.decisions % self.explore_every == 0:
            return LOOKUP if best == SAT else SAT
        return best

    def after_pass(self, arm: str | None, tokens: int, seconds: float) -> None:
        """Record a pass: ``arm`` if it was a decision (None: no choice was made in it).

        A decision is scored with the pass after it; a decision pass right after another
        closes the earlier one and opens its own.
        """
        if self._open is not None:
            open_arm, open_tokens, open_seconds = self._open
            self._score(open_arm, open_tokens + tokens, open_seconds + seconds)
            self._open = None
        if arm is not None:
            self._open = (arm, tokens, seconds)

    def reset_pending(self) -> None:
        """Drop an open decision (its next pass will not come: the batch emptied)."""
        self._open = None

    def _score(self, arm: str, tokens: int, seconds: float) -> None:
        for name in (SAT, LOOKUP):
            self.tokens[name] *= self.decay if name == arm else 1.0
            self.seconds[name] *= self.decay if name == arm else 1.0
        self.tokens[arm] += tokens
        self.seconds[arm] += seconds
        self.counts[arm] += 1

    def snapshot(self) -> dict:
        return {
            "sat_tok_per_s": self.rate(SAT),
            "lookup_tok_per_s": self.rate(LOOKUP),
            "decisions": self.decisions,
            "scored": dict(self.counts),
            "best": self.best(),
        }
