"""Incremental detokenization with the default model's real byte-level BPE tokenizer, on text
whose decoded form changes as tokens arrive (characters split across tokens)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sdsat.decode.batch import Sequence
from sdsat.engine.text_stream import TextStream
from sdsat.model.default_model import default_checkpoint

TEXT = "naïve café, 日本語のテキスト 😀🎉 and Ünïcödé: «quotes» — done.\n" * 8


class Counting:
    """The real tokenizer, counting the tokens it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoded = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def bpe():
    return AutoTokenizer.from_pretrained(default_checkpoint())


def stream_through(tok, ids: list[int], per_step: int, stop: tuple[str, ...] = ()) -> tuple[list[str], Sequence, TextStream]:
    seq = Sequence([1], len(ids), stop=stop)
    stream = TextStream(tok)
    deltas = []
    for i in range(0, len(ids), per_step):
        seq.append(ids[i : i + per_step], tok)
        deltas.append(stream.delta(seq))
        if seq.finished:
            break
    return deltas, seq, stream


def test_the_text_changes_as_tokens_arrive(bpe):
    ids = bpe.encode(TEXT)
    partial = [bpe.decode(ids[:n]) for n in range(1, 40)]
    assert any(p.endswith("\ufffd") for p in partial)  # a character split across tokens


@pytest.mark.parametrize("per_step", [1, 3, 7])
def test_deltas_add_up_to_the_text_and_never_split_a_character(bpe, per_step):
    ids = bpe.encode(TEXT)
    deltas, seq, stream = stream_through(bpe, ids, per_step)
    assert seq.finish_reason == "length"
    assert "".join(deltas) == bpe.decode(ids) == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d) > len(deltas) // 2  # text flows as it comes, not at the end


def test_decoding_is_incremental(bpe):
    """Streaming n tokens decodes O(n) tokens in all (the whole output each step was O(n^2))."""
    ids = bpe.encode(TEXT)
    tok = Counting(bpe)
    stream_through(tok, ids, per_step=1)
    n = len(ids)
    assert n > 200
    assert tok.decoded <= 6 * n, f"decoded {tok.decoded} tokens to stream {n}"


def test_stop_strings_with_the_real_tokenizer(bpe):
    ids = bpe.encode(TEXT)
    deltas, seq, stream = stream_through(bpe, ids, per_step=2, stop=("テキスト 😀",))
    assert seq.finish_reason == "stop"
    assert "".join(deltas) == seq.text(bpe) == TEXT[: TEXT.index("テキスト 😀")]

    tok = Counting(bpe)
    deltas, seq, stream = stream_through(tok, ids, per_step=2, stop=("not in the text",))
    assert seq.finish_reason == "length" and "".join(deltas) == TEXT
    assert tok.decoded <= 40 * len(ids)  # the stop check decodes a short tail per step, not the output
