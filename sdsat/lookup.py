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
