"""SDSAT greedy decoding equals plain greedy decoding, token for token (fp32, tiny random models)."""

from __future__ import annotations

import math

import pytest
import torch

from sdsat.decode.decoding import accept, greedy
from sdsat.decode.generate import generate, make_sequences, oracle_drafts, stream
from tests.conftest import hf_greedy, tiny_loaded

NEW_TOKENS = 48
RAGGED = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], [3]]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    loaded = tiny_loaded(request.param, k=8)
    refs = [hf_greedy(loaded, p, NEW_TOKENS) for p in RAGGED]
    return loaded, refs


def run(loaded, prompts, k, override=None):
    """The paper's two-step iteration at k (plain greedy at 0)."""
    seqs = make_sequences(loaded, prompts, NEW_TOKENS, eos=False)
    return generate(loaded, seqs, k, override(seqs) if override else None, two_step=k > 0)


def test_plain_greedy_matches_transformers_generate(tiny):
    loaded, refs = tiny
    out = run(loaded, RAGGED, 0)
    assert [s.output_ids for s in out] == refs
    assert all(s.stats.forward_passes == NEW_TOKENS for s in out)


@pytest.mark.parametrize("k", range(1, 9))
def test_sdsat_matches_greedy_batch_1(tiny, k):
    loaded, refs = tiny
    for prompt, ref in zip(RAGGED, refs):
        (seq,) = run(loaded, [prompt], k)
        assert seq.output_ids == ref
        assert seq.stats.iterations < NEW_TOKENS  # several verify rounds, each emitting >= 2 tokens


@pytest.mark.parametrize("k", range(1, 9))
def test_sdsat_matches_greedy_ragged_batch(tiny, k):
    loaded, refs = tiny
    out = run(loaded, RAGGED, k)
    assert [s.output_ids for s in out] == refs


def test_ragged_batch_rows_accept_different_amounts(tiny):
    """With oracle drafts for some rows and garbage for the others, rows diverge in length per step."""
    loaded, refs = tiny
    k = 4
    seqs = make_sequences(loaded, RAGGED, NEW_TOKENS, eos=False)
    right = oracle_drafts({s.seq_id: r for s, r in zip(seqs, refs)})
    wrong = oracle_drafts({s.seq_id: r for s, r in zip(seqs, refs)}, wrong=True, vocab_size=200)
    good_rows = {seqs[0].seq_id, seqs[2].seq_id}

    def mixed(sequences, drafts):
        good, bad = right(sequences, drafts), wrong(sequences, drafts)
        pick = torch.tensor([s.seq_id in good_rows for s in sequences])[:, None]
        return torch.where(pick, good, bad)

    generate(loaded, seqs, k, mixed)
    assert [s.output_ids for s in seqs] == refs
    for seq in seqs:
        expected = k if seq.seq_id in good_rows else 0
        assert seq.stats.accepted_per_offset[0] / seq.stats.drafted_per_offset[0] == pytest.approx(
            1.0 if expected else 0.0, abs=0.1
        )


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_oracle_drafts_accept_all(tiny, k):
    loaded, refs = tiny
    seqs = make_sequences(loaded, RAGGED, NEW_TOKENS, eos=False)
    generate(loaded, seqs, k, oracle_drafts({s.seq_id: r for s, r in zip(seqs, refs)}))
    assert [s.output_ids for s in seqs] == refs
    iterations = math.ceil(NEW_TOKENS / (k + 2))
    for seq in seqs:
        assert seq.stats.iterations == iterations
        assert seq.stats.forward_passes == 2 * iterations  # ~ 2n / (k + 2)
        # every draft accepted, except those past the end of the output in the last iteration
        assert seq.stats.accepted >= (iterations - 1) * k


@pytest.mark.parametrize("k", [1, 5, 8])
def test_garbage_drafts_accept_none(tiny, k):
    loaded, refs = tiny
    seqs = make_sequences(loaded, RAGGED, NEW_TOKENS, eos=False)
    generate(loaded, seqs, k, oracle_drafts({s.seq_id: r for s, r in zip(seqs, refs)}, wrong=True, vocab_size=200))
    assert [s.output_ids for s in seqs] == refs
    for seq in seqs:
        assert seq.stats.accepted == 0
        assert seq.stats.iterations == NEW_TOKENS // 2  # two tokens (y0 and the bonus) per iteration


def test_stream_yields_tokens_as_accepted(tiny):
    loaded, refs = tiny
    seqs = make_sequences(loaded, RAGGED[:2], NEW_TOKENS, eos=False)
    got = {s.seq_id: [] for s in seqs}
    steps = 0
    for events in stream(loaded, seqs, 3):
        steps += 1
        for event in events:
            got[event.sequence.seq_id].extend(event.new_ids)
    assert [got[s.seq_id] for s in seqs] == refs[:2]
    assert steps == max(s.stats.iterations for s in seqs)


def test_stops_per_row_on_eos_and_max_new_tokens(tiny):
    loaded, refs = tiny
    eos = refs[0][10]  # a token the first row emits at step 10
    seqs = make_sequences(loaded, RAGGED[:2], NEW_TOKENS, eos=False)
    seqs[0].eos_token_ids = frozenset({eos})
    seqs[1].max_new_tokens = 7
    generate(loaded, seqs, 4, two_step=True)
    first = refs[0].index(eos)
    assert seqs[0].output_ids == refs[0][: first + 1]
    assert seqs[0].finish_reason == "stop"
    assert seqs[1].output_ids == refs[1][:7]
    assert seqs[1].finish_reason == "length"


def test_stop_string_cuts_text_and_tokens(tiny):
    loaded, refs = tiny
    tok = loaded.tokenizer
    full = tok.decode(refs[0])
    at = next(i for i in range(10, len(full) - 2) if full.find(full[i : i + 2]) == i)
    stop = full[at : at + 2]
    seqs = make_sequences(loaded, RAGGED[:1], NEW_TOKENS, stop=(stop,), eos=False)
    generate(loaded, seqs, 5, two_step=True)
    seq = seqs[0]
    assert seq.finish_reason == "stop"
    assert seq.text(tok) == full[:at]
    assert stop in tok.decode(seq.output_ids) and stop not in tok.decode(seq.output_ids[:-1])
    assert seq.output_ids == refs[0][: len(seq.output_ids)]


def test_requires_sats_and_k_within_range(tiny):
    loaded, _ = tiny
    with pytest.raises(ValueError, match="out of range: this model has 8 SATs"):
        run(loaded, RAGGED[:1], 9)
    no_sat = type(loaded)(loaded.model, loaded.tokenizer, None, "plain-model", "")
    with pytest.raises(ValueError, match="has no SATs"):
        run(no_sat, RAGGED[:1], 2)


def test_prompt_beyond_context_is_refused(tiny):
    loaded, _ = tiny
    with pytest.raises(ValueError, match="exceeds the model's context"):
        make_sequences(loaded, [[1] * 1000], 100)
    with pytest.raises(ValueError, match="prompt is empty"):
        make_sequences(loaded, [[]], 10)


# --- The acceptance rule on hand-made logits: +/-100 so the argmax is known -------------------


def logits_for(tokens: list[list[int]], vocab: int = 16) -> torch.Tensor:
    """[B, len, vocab] logits whose argmax at [b, i] is tokens[b][i]."""
    out = torch.full((len(tokens), len(tokens[0]), vocab), -100.0)
    for b, row in enumerate(tokens):
        for i, t in enumerate(row):
            out[b, i, t] = 100.0
    return out


def test_accept_empty_draft():
    y0 = torch.tensor([3])
    z = greedy(logits_for([[7]]), None)  # k = 0: the verify pass only sees y0
    emitted, bonus = accept(y0, torch.empty(1, 0, dtype=torch.long), z)
    assert emitted == [[3, 7]]
    assert torch.equal(bonus, torch.tensor([7]))


def test_accept_first_position_rejected():
    y0, drafts = torch.tensor([1]), torch.tensor([[4, 5, 6]])
    z = greedy(logits_for([[9, 5, 6, 2]]), None)  # the model wants 9 where the draft says 4
    emitted, bonus = accept(y0, drafts, z)
    assert emitted == [[1, 9]]
    assert torch.equal(bonus, torch.tensor([9]))


def test_accept_all_plus_bonus():
    y0, drafts = torch.tensor([1]), torch.tensor([[4, 5, 6]])
    z = greedy(logits_for([[4, 5, 6, 11]]), None)
    emitted, bonus = accept(y0, drafts, z)
    assert emitted == [[1, 4, 5, 6, 11]]
    assert torch.equal(bonus, torch.tensor([11]))


def test_accept_mixed_batch():
    y0 = torch.tensor([1, 2, 3])
    drafts = torch.tensor([[4, 5, 6], [4, 5, 6], [4, 5, 6]])
    z = greedy(logits_for([[4, 5, 0, 12], [4, 5, 6, 13], [8, 5, 6, 14]]), None)
    emitted, bonus = accept(y0, drafts, z)
    assert emitted == [[1, 4, 5, 0], [2, 4, 5, 6, 13], [3, 8]]
    assert torch.equal(bonus, torch.tensor([0, 13, 8]))


def test_accept_stops_at_first_mismatch_even_if_later_match():
    y0, drafts = torch.tensor([1]), torch.tensor([[4, 5, 6]])
    z = greedy(logits_for([[4, 9, 6, 2]]), None)  # offset 2 wrong, offset 3 right: only 1 accepted
    emitted, _ = accept(y0, drafts, z)
    assert emitted == [[1, 4, 9]]


def test_banned_ids_are_never_chosen():
    logits = logits_for([[5, 6]])
    assert greedy(logits, torch.tensor([5])).tolist()[0][0] != 5
    assert greedy(logits, torch.tensor([5])).tolist()[0][1] == 6


def test_oracle_follows_the_decoder_after_leaving_a_stale_reference(tiny):
    """A reference that is wrong from token 10 on is re-derived from the row's own output."""
    loaded, refs = tiny
    k = 4
    stale = refs[0][:10] + [(t + 1) % 200 for t in refs[0][10:]]
    seqs = make_sequences(loaded, RAGGED[:1], NEW_TOKENS, eos=False)

    def regenerate(seq):
        (again,) = generate(loaded, make_sequences(loaded, [seq.prompt_ids + seq.output_ids], 48, eos=False), 0)
        return again.output_ids

    override = oracle_drafts({seqs[0].seq_id: stale}, regenerate=regenerate)
    generate(loaded, seqs, k, override)
    assert seqs[0].output_ids == refs[0]
    assert override.seconds > 0  # the stale reference was replaced once the row left it
    stats = seqs[0].stats
    assert stats.accepted >= stats.drafted - 2 * k - k  # all but the iteration at the bad token and the last
