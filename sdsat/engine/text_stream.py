"""Text deltas for streaming a sequence's output.

A delta never contains a stop string or anything after it, holds back text that could
still become a stop string, and never splits a multi-byte character (a trailing U+FFFD
from a partial byte sequence is held back until the next token completes it). The
concatenated deltas equal the sequence's final text.

Decoding is incremental: each step decodes only the tokens since the last complete text
(and the step before, as context), never the whole output, so streaming n tokens costs O(n)
decoding rather than O(n^2). The final text is decoded once, in full, when the sequence ends.
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
        self.text = ""  # the output's text up to token ``read`` (complete characters only)
        self.prefix = 0  # tokens from here to ``read`` are decoded again as context for the next ones
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, ids: list[int]) -> None:
        """Add the text of the tokens past ``read``, once they decode to whole characters.

        Decoding them after the previous step's tokens and subtracting that text keeps what
        depends on the tokens before (a leading space, a merged byte sequence) right."""
        context = self._decode(ids[self.prefix : self.read])
        text = self._decode(ids[self.prefix :])
        if len(text) > len(context) and not text.endswith(_PARTIAL) and text.startswith(context):
            self.text += text[len(context) :]
            self.prefix, self.read = self.read, len(ids)

    def delta(self, seq: Sequence) -> str:
        """The new text that can be handed out now."""
        if seq.finished:
            text = seq.text(self.tokenizer)
            end = len(text)
        else:
            self._advance(seq.output_ids)
            text = self.text
            end = len(text) - held_back(text, seq.stop)
        if not text.startswith(self.sent):
            # Decoding more tokens rewrote earlier text (some tokenizers clean up spaces):
            # what was sent stands; hand out only what lies beyond it.
            log.warning("sequence %d: decoded text changed before the streamed position", seq.seq_id)
        if end <= len(self.sent):
            return ""
        out = text[len(self.sent) : end]
        self.sent += out
        return out
