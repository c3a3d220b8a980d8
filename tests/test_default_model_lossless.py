"""The default model in fp32: SDSAT output is identical to plain greedy decoding.

In fp32 a pass over k+1 tokens can round differently from one-token steps by ~1e-6, so an
argmax between two near-equal logits could in principle flip. Where outputs differ the test
requires that exact case: the two tokens' logits at the first divergence, from a plain
full forward, are within a tie margin. Anything else is a bug.
"""

from __future__ import annotations

import pytest
import torch

from sdsat.decode.generate import generate, make_sequences, oracle_drafts
from sdsat.decode.scheduler import Scheduler
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow

PROMPTS = [
    "def fibonacci(n):\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "import json\n\ndef load_config(path):\n    \"\"\"Read a JSON config file.\"\"\"\n",
]
NEW_TOKENS = 64
TIE_MARGIN = 1e-3


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def tie_margin(loaded, prompt: list[int], prefix: list[int], x: int, y: int) -> float:
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt + prefix])).logits[0, -1]
    return abs(float(logits[x] - logits[y]))


def assert_same_or_tie(loaded, prompts, reference, outputs):
    for prompt, ref, out in zip(prompts, reference, outputs):
        at = first_divergence(ref, out)
        if at is None:
            assert ref == out
            continue
        margin = tie_margin(loaded, prompt, ref[:at], ref[at], out[at])
        assert margin < TIE_MARGIN, f"diverged at token {at} with logit margin {margin}: not a near-tie, a bug"
        print(f"near-tie flip at token {at}, fp32 margin {margin:.2e}")


@pytest.fixture(scope="module")
def setup(default_fp32):
    loaded = default_fp32
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    plain = generate(loaded, make_sequences(loaded, prompts, NEW_TOKENS, eos=False), 0)
    return loaded, prompts, [s.output_ids for s in plain]


def test_plain_loop_matches_transformers_generate(setup):
    loaded, prompts, plain = setup
    ref = [hf_greedy(loaded, prompt, NEW_TOKENS) for prompt in prompts]
    assert_same_or_tie(loaded, prompts, ref, plain)


@pytest.mark.parametrize("k", [1, 5])
def test_two_step_sdsat_equals_plain_greedy_batched(setup, k):
    loaded, prompts, plain = setup
    seqs = generate(loaded, make_sequences(loaded, prompts, NEW_TOKENS, eos=False), k, two_step=True)
    assert_same_or_tie(loaded, prompts, plain, [s.output_ids for s in seqs])


@pytest.mark.parametrize("k,lookup", [(5, 0), (5, 16), (0, 16)])
def test_scheduled_decoding_equals_plain_greedy(setup, k, lookup):
    """The default decoder (sdsat/decode/fused.py with sdsat/decode/scheduler.py) across its
    choices: a cost that makes every width worth a try, and exploration every third pass."""
    loaded, prompts, plain = setup
    seqs = make_sequences(loaded, prompts, NEW_TOKENS, eos=False)
    scheduler = Scheduler(lambda rows, q: 1.0 + 0.2 * (q % 4), explore_fraction=0.5, explore_every=3)
    scheduler.total_s = 1e9  # exploration never runs out of budget
    generate(loaded, seqs, k, lookup=lookup, scheduler=scheduler)
    assert len(scheduler.widths) > 2
    assert_same_or_tie(loaded, prompts, plain, [s.output_ids for s in seqs])
    if lookup:
        assert sum(s.stats.accepted for s in seqs) > 0


def test_default_decoder_equals_plain_greedy(setup):
    """generate's default: a scheduler on this machine's measured pass costs."""
    loaded, prompts, plain = setup
    seqs = generate(loaded, make_sequences(loaded, prompts, NEW_TOKENS, eos=False), 5)
    assert_same_or_tie(loaded, prompts, plain, [s.output_ids for s in seqs])


def test_sdsat_with_oracle_drafts_equals_plain_greedy(setup):
    """Every draft accepted: each verify pass commits k+1 tokens computed in one pass."""
    loaded, prompts, plain = setup
    seqs = make_sequences(loaded, prompts, NEW_TOKENS, eos=False)
    generate(loaded, seqs, 5, oracle_drafts({s.seq_id: p for s, p in zip(seqs, plain)}))
    assert_same_or_tie(loaded, prompts, plain, [s.output_ids for s in seqs])
    for seq in seqs:
        assert seq.stats.tau > 6.0  # 7 tokens per iteration but the last
