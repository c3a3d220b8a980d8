"""Prompt-lookup drafts: what followed the last time the context's newest n-gram appeared.

Code and edits repeat names, lines and whole phrases of their prompt; when the newest n
tokens (n = 3, then 2, then 1) occurred before, the tokens that followed them then are a
free guess at what follows now. The fused decoder (:mod:`sdsat.fused`) verifies these
guesses beside the SAT drafts in the same pass, so they never change the output.
"""

from __future__ import annotations

MAX_NGRAM = 3
MIN_NGRAM = 1


def lookup_drafts(history: list[int], m: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to m tokens that followed the most recent earlier occurrence of history's newest
    n-gram, longest n first; [] when there is none. ``history`` ends with the token the
    drafts follow."""
    size = len(history)
    if m <= 0:
        return []
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        tail = history[size - n :]
        first = tail[0]
        # Newest match first; a match must leave at least one token after it.
        for start in range(size - n - 1, -1, -1):
            if history[start] == first and history[start : start + n] == tail:
                return history[start + n : start + n + m]
    return []


class LookupIndex:
    """:func:`lookup_drafts` for a growing sequence in O(1) per step: the newest end of every
    1..max_ngram-gram is kept in a dict, filled as tokens arrive, instead of a scan of the
    whole history each step."""

    def __init__(self, tokens: list[int], max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        self.tokens: list[int] = []
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> index just past its newest occurrence
        self.indexed = 0  # n-grams ending before this index are in ``ends``
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def drafts(self, m: int) -> list[int]:
        """Up to m tokens that followed the newest earlier occurrence of the newest n-gram."""
        size = len(self.tokens)
        if m <= 0 or size < 2:
            return []
        # Index every n-gram that ends before the last token: those leave a token after them.
        toks, ends = self.tokens, self.ends
        for end in range(max(self.indexed, 1), size):
            for n in range(1, min(self.max_ngram, end) + 1):
                ends[tuple(toks[end - n : end])] = end
        self.indexed = size
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            end = ends.get(tuple(toks[size - n :]))
            if end is not None:
                return toks[end : end + m]
        return []
