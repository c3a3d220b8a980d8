"""Plain sampling (hand-made distributions) and streamed text deltas (stop strings, multi-byte)."""

from __future__ import annotations

import pytest
import torch

from sdsat.decode.batch import Sequence
from sdsat.decode.sample_accept import RowSampler, sample_nodes
from sdsat.decode.target import SamplingParams
from sdsat.engine.text_stream import TextStream, held_back
from tests.conftest import TinyTokenizer


def draw(logits: torch.Tensor, params: list[SamplingParams], banned=None) -> torch.Tensor:
    """One plain draw per row. logits [B, V] -> tokens [B]."""
    root = torch.zeros(len(params), 1, dtype=torch.long)
    return sample_nodes(logits[:, None], root, root, root[..., None], [RowSampler(p) for p in params], banned)[:, 0]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sample_follows_the_tempered_distribution(temperature):
    target = torch.tensor([0.1, 0.2, 0.7, 0.0])
    draws = 20000
    logits = target.clamp_min(1e-30).log().expand(draws, -1)  # [draws, 4]
    tokens = draw(logits, [SamplingParams(temperature, seed=i) for i in range(draws)])
    freq = torch.bincount(tokens, minlength=4).float() / draws
    expected = target ** (1 / temperature)
    expected /= expected.sum()
    assert torch.allclose(freq, expected, atol=0.015)
    assert freq[3] == 0


def test_sample_never_draws_banned_ids_and_seeds_reproduce():
    logits = torch.zeros(64, 8)  # uniform
    banned = torch.tensor([6, 7])
    run = lambda seed: draw(logits, [SamplingParams(1.0, seed=seed + i) for i in range(64)], banned)  # noqa: E731
    first = run(1)
    assert int(first.max()) < 6
    assert torch.equal(first, run(1))
    assert not torch.equal(first, run(2))


def test_held_back():
    assert held_back("abc", ("cd",)) == 1
    assert held_back("abc", ("bcx", "cd")) == 2
    assert held_back("abc", ("x",)) == 0
    assert held_back("ab", ("abc",)) == 2
    assert held_back("", ("abc",)) == 0


def feed(stream: TextStream, seq: Sequence, text: str, tokenizer) -> str:
    seq.append(list(text.encode("latin-1")), tokenizer)
    return stream.delta(seq)


def test_stream_holds_back_possible_stop_strings():
    tok = TinyTokenizer()
    seq = Sequence([1], 50, stop=("END",))
    stream = TextStream(tok)
    assert feed(stream, seq, "abcE", tok) == "abc"
    assert feed(stream, seq, "N", tok) == ""
    assert feed(stream, seq, "X", tok) == "ENX"  # not a stop string after all
    assert feed(stream, seq, "yEND tail", tok) == "y"
    assert seq.finish_reason == "stop"
    assert stream.sent == seq.text(tok) == "abcENXy"


class Utf8Tokenizer(TinyTokenizer):
    """Ids are UTF-8 bytes: one character may take several tokens."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


def test_stream_never_splits_a_multibyte_character():
    tok = Utf8Tokenizer()
    seq = Sequence([1], 50)
    stream = TextStream(tok)
    deltas = []
    for byte in "é€!".encode():
        seq.append([byte], tok)
        deltas.append(stream.delta(seq))
    assert "\ufffd" not in "".join(deltas)
    assert [d for d in deltas if d] == ["é", "€", "!"]
