"""Drafts verified and accepted in one step, per draft source and per position.

Sources: "sat" (SAT drafts: the two-step iteration's chain or tree, a fused pass's pending
chain and the draft head's alternatives to its first draft) and "lookup" (prompt-lookup tries). Position d is a draft's depth below the verified
root: the draft for d tokens ahead. Verified counts every draft fed to the verify pass (a
trie may hold several at one depth); accepted counts the accepted path's drafts, credited to
the source whose nodes the path runs through (the SAT chain where both give the same path:
the acceptance rule prefers the first-listed node). These are what serving metrics export,
like vLLM's ``spec_decode_num_accepted_tokens_per_pos``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .acceptance import depths

SAT, LOOKUP = "sat", "lookup"


@dataclass
class DraftCounts:
    verified: dict[str, list[int]] = field(default_factory=dict)  # source -> drafts verified at position 1..
    accepted: dict[str, list[int]] = field(default_factory=dict)  # source -> drafts accepted at position 1..

    def add(self, kind: str, source: str, position: int, n: int = 1) -> None:
        counts = getattr(self, kind).setdefault(source, [])
        counts += [0] * (position - len(counts))
        counts[position - 1] += n

    def total(self, kind: str) -> int:
        return sum(sum(counts) for counts in getattr(self, kind).values())


def sat_counts(per_depth: list[int], accepted: list[int]) -> DraftCounts:
    """A SAT chain or tree with per_depth[d-1] drafts at depth d in every row; accepted per row."""
    counts = DraftCounts()
    for depth, n in enumerate(per_depth, start=1):
        counts.add("verified", SAT, depth, n * len(accepted))
    for a in accepted:
        for depth in range(1, a + 1):
            counts.add("accepted", SAT, depth)
    return counts


def fused_counts(drafts: list[list[int]], parents: list[list[int]], sat: list[int], accepted: list[int], emitted: list[list[int]]) -> DraftCounts:
    """A fused pass. Per row: its drafts and their parents (-1: the root), of which the first
    sat[row] are its SAT drafts (its pending chain and the draft head's alternatives to the
    chain's first draft) and the rest its lookup trie; the drafts it accepted and the tokens
    it emitted."""
    counts = DraftCounts()
    for row, a in enumerate(accepted):
        c = sat[row]
        paths: list[tuple[int, ...]] = []  # each SAT node's tokens from the root
        for i, depth in enumerate(depths(parents[row])):
            counts.add("verified", SAT if i < c else LOOKUP, depth)
            if i < c:
                p = parents[row][i]
                paths.append((() if p < 0 else paths[p]) + (drafts[row][i],))
        source = SAT if a == 0 or tuple(emitted[row][:a]) in paths else LOOKUP
        for depth in range(1, a + 1):
            counts.add("accepted", source, depth)
    return counts
