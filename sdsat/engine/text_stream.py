"""Text deltas for streaming a sequence's output.

A delta never contains a stop string or anything after it, holds back text that could
still become a stop string, and never splits a multi-byte character (a trailing U+FFFD
from a partial byte sequence is held back until the next token completes it). The
concatenated deltas equal the sequence's final text.
"""

from __future__ import annotations

import logging

from ..decode.batch import Sequence

log = logging.getLogger(__name__)

_PARTIAL = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class TextStream:
    """Turns a growing sequence into text deltas."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sent = ""  # text already handed out

    def delta(self, seq: Sequence) -> str:
        """The new text that can be handed out now."""
        if seq.finished:
            text = seq.text(self.tokenizer)
            end = len(text)
        else:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            end = len(text.rstrip(_PARTIAL))
            end -= held_back(text[:end], seq.stop)
        if not text.startswith(self.sent):
            # Decoding more tokens rewrote earlier text (some tokenizers clean up spaces):
            # what was sent stands; hand out only what lies beyond it.
            log.warning("sequence %d: decoded text changed before the streamed position", seq.seq_id)
        if end <= len(self.sent):
            return ""
        out = text[len(self.sent) : end]
        self.sent += out
        return out
