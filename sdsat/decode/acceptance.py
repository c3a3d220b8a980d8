"""Online estimates of how often a draft is right, per draft source.

A draft node is *right* when its path from the root equals the tokens the decoder then
emits; verified with its ancestors, it is accepted exactly when it is right. Estimates are
decayed counts, so they follow the text:
- a prompt-lookup node by its trie score (:mod:`sdsat.decode.lookup`; bucketed on a log scale):
  a node backed by several long, recent matches is right far more often than one backed by
  a single 1-gram;
- a SAT draft by its depth (offset from the root) and whether the row also had lookup
  drafts; it counts as right only where no verified lookup node was right at that depth, so
  the estimate is what the SAT drafts add beside lookup;
- a draft head's alternative to the first SAT draft (its rank-r guess, a sibling of that
  draft) by its rank, counted the same way. The token after the root is emitted by every
  pass, so every offered alternative is scored, verified or not: no exploration needed.

Lookup drafts cost nothing to make, so every trie is scored against the tokens that follow,
offered or not (:func:`node_truth`): their estimates need no exploration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SCORE_BUCKETS = 12


def depths(parents: list[int]) -> list[int]:
    """Each node's depth in a tree given as parents (-1: under the root; parents come first)."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def node_truth(tokens: list[int], parents: list[int], truth: list[int]) -> list[bool | None]:
    """Per node (parents before children; -1: under the root): True if its path equals
    truth's leading tokens, False if it cannot, None if truth is too short to tell yet."""
    out: list[bool | None] = []
    for token, parent, depth in zip(tokens, parents, depths(parents)):
        up = True if parent < 0 else out[parent]
        if up is False:
            out.append(False)
        elif depth > len(truth):
            out.append(None)
        else:
            out.append(up and token == truth[depth - 1])
    return out


def score_bucket(score: float) -> int:
    """Half-decades of a lookup node's trie score, clipped to [0, SCORE_BUCKETS)."""
    if score <= 0:
        return 0
    return min(SCORE_BUCKETS - 1, max(0, math.floor(2 * math.log10(score)) + 2))


@dataclass
class Rates:
    """Decayed hit counts per key, with a prior of ``prior_hits`` in ``prior_seen``."""

    decay: float = 0.995
    prior_hits: float = 1.0
    prior_seen: float = 2.0
    hits: dict = field(default_factory=dict)
    seen: dict = field(default_factory=dict)

    def rate(self, key) -> float:
        return self.hits.get(key, self.prior_hits) / self.seen.get(key, self.prior_seen)

    def add(self, key, right: bool) -> None:
        self.hits[key] = self.hits.get(key, self.prior_hits) * self.decay + float(right)
        self.seen[key] = self.seen.get(key, self.prior_seen) * self.decay + 1.0

    def snapshot(self) -> dict:
        return {str(k): round(self.rate(k), 4) for k in sorted(self.seen)}


@dataclass
class Acceptance:
    """Greedy and sampled rows are counted apart (``sampled``): a draw matches a draft less
    often than the argmax does."""

    lookup: Rates = field(default_factory=Rates)  # (sampled, score bucket) -> P(right)
    sat: Rates = field(default_factory=Rates)  # (sampled, depth, row had lookup drafts) -> P(right where lookup was not)
    alt: Rates = field(default_factory=Rates)  # (sampled, rank, row had lookup drafts) -> P(right where lookup was not)

    def lookup_p(self, score: float, sampled: bool = False) -> float:
        return self.lookup.rate((sampled, score_bucket(score)))

    def sat_p(self, depth: int, with_lookup: bool, sampled: bool = False) -> float:
        return self.sat.rate((sampled, depth, with_lookup))

    def alt_p(self, rank: int, with_lookup: bool, sampled: bool = False) -> float:
        return self.alt.rate((sampled, rank, with_lookup))

    def observe_alt(self, alternatives: list[int], first: int, lookup_right: bool, with_lookup: bool, sampled: bool = False) -> None:
        """A row's alternatives (ranks 1.., in order) against ``first``, the token the pass
        emitted right after the root; lookup_right: a verified lookup node had it."""
        for rank, token in enumerate(alternatives, 1):
            self.alt.add((sampled, rank, with_lookup), token == first and not lookup_right)

    def observe_lookup(self, scores: list[float], right: list[bool | None], sampled: bool = False) -> None:
        for score, r in zip(scores, right):
            if r is not None:
                self.lookup.add((sampled, score_bucket(score)), r)

    def observe_sat(
        self, drafts: list[int], truth: list[int], lookup_right_depths: set[int], with_lookup: bool, sampled: bool = False
    ) -> None:
        """A verified SAT chain against the emitted tokens (``truth``: accepted drafts and the
        bonus, so every chain node is decided)."""
        for depth, right in enumerate(node_truth(drafts, list(range(-1, len(drafts) - 1)), truth), 1):
            self.sat.add((sampled, depth, with_lookup), bool(right) and depth not in lookup_right_depths)

    def snapshot(self) -> dict:
        return {"lookup_by_score_bucket": self.lookup.snapshot(), "sat_by_depth_with_lookup": self.sat.snapshot(),
                "head_alternative_by_rank_with_lookup": self.alt.snapshot()}
