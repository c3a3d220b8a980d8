"""Log-probabilities come from the pass that decided each token, and equal a plain forward's.

For every decoding path the engine uses (plain, two-step SDSAT, fused with lookup tries,
sampling) and for the prompt (prefill), each recorded entry must equal the log-softmax of one
plain fp32 forward over prompt + output at that position, SATs excluded, with drafts accepted
along the way: so the entries were taken at the accepted path's positions, not elsewhere.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from sdsat.decode.batch import Batch
from sdsat.decode.generate import generate, make_sequences, oracle_drafts
from sdsat.decode.scheduler import Scheduler
from sdsat.decode.target import SamplingParams
from sdsat.decode.scheduler import Scheduler
from sdsat.engine.engine import Engine, EngineConfig, Request
from tests.conftest import tiny_loaded

TOP = 3
NEW = 24
# Repetitive prompts: prompt-lookup drafts get accepted on them.
FREE = lambda rows, q: 1.0  # noqa: E731  (an injected pass cost: drafting always pays, so every pass drafts)
PROMPTS = [[5, 6, 7, 8, 9, 10] * 4, [40, 41, 42] * 6 + [40], [100, 101, 102, 103]]


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded("llama", k=4)


def reference(loaded, prompt: list[int], output: list[int]) -> torch.Tensor:
    """Log-softmax [len(prompt) + len(output) - 1, V] of one plain forward (SATs excluded):
    row i is the distribution of token i + 1."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt + output])).logits[0, :-1].float()
    logits[:, loaded.sat.unique_ids] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def assert_entries_match(ref: torch.Tensor, start: int, tokens: list[int], entries) -> None:
    """entries[i] is token tokens[i] at reference row start + i."""
    assert len(entries) == len(tokens)
    for i, (token, entry) in enumerate(zip(tokens, entries)):
        row = ref[start + i]
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        values, ids = row.topk(TOP)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


def check_outputs(loaded, sequences) -> None:
    for seq in sequences:
        assert seq.output_ids, "nothing generated"
        ref = reference(loaded, seq.prompt_ids, seq.output_ids)
        assert_entries_match(ref, len(seq.prompt_ids) - 1, seq.output_ids, seq.token_logprobs)


def with_logprobs(loaded, prompts, wanted=(True, False, True)):
    seqs = make_sequences(loaded, prompts, NEW, eos=False)
    for seq, want in zip(seqs, wanted):
        seq.logprobs = TOP if want else None
    return seqs


@pytest.mark.parametrize("mode", ["plain", "fused+lookup", "two-step oracle"])
def test_greedy_logprobs_equal_a_plain_forward(tiny, mode):
    seqs = with_logprobs(tiny, PROMPTS)
    if mode == "plain":
        generate(tiny, seqs, num_sat=0)
    elif mode == "fused+lookup":
        generate(tiny, seqs, num_sat=4, lookup=8, scheduler=Scheduler(FREE))
    else:
        refs = [s.output_ids for s in generate(tiny, make_sequences(tiny, PROMPTS, NEW, eos=False))]
        generate(tiny, seqs, num_sat=4, draft_override=oracle_drafts({s.seq_id: r for s, r in zip(seqs, refs)}))
    if mode != "plain":
        assert sum(s.stats.accepted for s in seqs) > 0, "no draft was accepted: the test would not cover verify positions"
    asked = [s for s in seqs if s.logprobs is not None]
    check_outputs(tiny, asked)
    assert all(not s.token_logprobs for s in seqs if s.logprobs is None)  # only rows that asked


@pytest.mark.parametrize("drafts", [False, True])
def test_sampled_tokens_get_the_models_own_logprobs(tiny, drafts):
    """Plain sampling steps, or scheduled passes that verify drafts for the sampled rows."""
    seqs = with_logprobs(tiny, PROMPTS)
    scheduler = Scheduler(lambda rows, q: 1.0) if drafts else None
    batch = Batch(tiny.model, tiny.tokenizer, tiny.sat.unique_ids, scheduler=scheduler)
    batch.add(seqs, [SamplingParams(0.8, 0.9, seed=i) for i in range(len(seqs))])
    while len(batch):
        batch.scheduled_step(tiny.sat.ids_for(4), lookup=8) if drafts else batch.step()
    check_outputs(tiny, [s for s in seqs if s.logprobs is not None])


def test_prompt_logprobs_come_from_the_prefill(tiny):
    seqs = make_sequences(tiny, PROMPTS + [[77]], 2, eos=False)
    for seq in seqs[:2] + seqs[3:]:
        seq.prompt_logprobs = TOP
    Batch(tiny.model, tiny.tokenizer, tiny.sat.unique_ids).add(seqs)
    for seq in seqs[:2]:
        entries = seq.prompt_token_logprobs
        assert entries[0] is None and len(entries) == len(seq.prompt_ids)
        assert_entries_match(reference(tiny, seq.prompt_ids, []), 0, seq.prompt_ids[1:], entries[1:])
    assert seqs[2].prompt_token_logprobs is None
    assert seqs[3].prompt_token_logprobs == [None]  # one token: nothing predicts it


def test_stop_string_cut_keeps_logprobs_aligned(tiny):
    full = generate(tiny, make_sequences(tiny, PROMPTS[:1], NEW, eos=False), num_sat=4, lookup=8, scheduler=Scheduler(FREE))[0]
    text = full.text(tiny.tokenizer)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    seq = make_sequences(tiny, PROMPTS[:1], NEW, eos=False, stop=(stop,))[0]
    seq.logprobs = TOP
    generate(tiny, [seq], num_sat=4, lookup=8, scheduler=Scheduler(FREE))
    assert seq.finish_reason == "stop" and len(seq.output_ids) < NEW
    check_outputs(tiny, [seq])


def test_engine_chunks_carry_logprobs(tiny):
    async def main():
        engine = Engine(tiny, EngineConfig(num_sat=4, lookup=8), scheduler=Scheduler(FREE))
        try:
            request = Request(PROMPTS[0], NEW, logprobs=TOP, prompt_logprobs=TOP)
            return [c async for c in engine.generate(request)]
        finally:
            await engine.shutdown()

    chunks = asyncio.run(main())
    tokens = [t for c in chunks for t in c.token_ids]
    entries = [e for c in chunks for e in c.logprobs]
    ref = reference(tiny, PROMPTS[0], tokens)
    assert_entries_match(ref, len(PROMPTS[0]) - 1, tokens, entries)
    assert chunks[0].prompt_logprobs is not None and all(c.prompt_logprobs is None for c in chunks[1:])
    assert_entries_match(ref, 0, PROMPTS[0][1:], chunks[0].prompt_logprobs[1:])


def test_engine_refuses_bad_logprobs(tiny):
    engine = Engine(tiny, EngineConfig(num_sat=4, calibration_budget_s=0.0))
    try:
        for bad in (-1, 21, 2.5):
            with pytest.raises(ValueError, match="logprobs"):
                engine.validate(Request([1, 2], 4, logprobs=bad))
    finally:
        asyncio.run(engine.shutdown())
