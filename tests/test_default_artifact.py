"""The shipped SAT artifact of the default model (sdsat/artifacts/default): it loads, it leaves
the base model's standard-token logits unchanged, its drafts get accepted, and SDSAT with it
is lossless in fp32."""

from __future__ import annotations

import pytest
import torch

from sdsat.model.adapter import get_adapter
from sdsat.model.draft_head import ATTR as HEAD_ATTR
from sdsat.model.draft_head import get_head
from sdsat.decode.generate import generate, make_sequences
from sdsat.model.load import DEFAULT_ARTIFACT, load_model

pytestmark = pytest.mark.slow

PROMPTS = [
    'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same backwards."""\n',
    "import os\n\n\ndef list_python_files(root):\n    ",
]


@pytest.fixture(scope="module")
def pair():
    if not (DEFAULT_ARTIFACT / "sdsat_config.json").exists():
        pytest.fail(f"the shipped artifact is missing: {DEFAULT_ARTIFACT}")
    return load_model("default", dtype="float32"), load_model("default-base", dtype="float32")


def test_artifact_is_small_and_loads_with_trained_sats(pair):
    adapted, base = pair
    size = sum(p.stat().st_size for p in DEFAULT_ARTIFACT.iterdir())
    assert size <= 20 * 2**20
    assert adapted.sat is not None and adapted.sat.num_sat_trained >= 5 and adapted.sat.adapter
    assert get_adapter(adapted.model) is not None and get_adapter(base.model) is None
    assert base.sat is None


def test_standard_token_logits_are_the_base_models(pair):
    adapted, base = pair
    ids = torch.tensor([adapted.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        out, ref = adapted.model(ids).logits, base.model(ids).logits
    assert torch.equal(out[..., : ref.shape[-1]], ref)


def test_sdsat_with_the_artifact_is_lossless_in_fp32_and_accepts_drafts(pair):
    adapted, base = pair
    prompts = [adapted.tokenizer.encode(p) for p in PROMPTS]
    plain = generate(base, make_sequences(base, prompts, 48))
    sdsat = generate(adapted, make_sequences(adapted, prompts, 48), num_sat=5, two_step=True)  # SAT drafts alone
    assert [s.output_ids for s in sdsat] == [s.output_ids for s in plain]
    accepted = sum(s.stats.accepted for s in sdsat)
    iterations = sum(s.stats.iterations for s in sdsat)
    # Untrained SATs get ~0.2 drafts accepted per iteration; the artifact must do far better.
    assert accepted / iterations > 0.5


def test_the_shipped_draft_head_raises_acceptance_and_stays_lossless(pair):
    """The artifact's draft head chains the SAT guesses; on these prompts its drafts are
    accepted more often than the same SATs' independent guesses, with identical output."""
    adapted, _ = pair
    head = get_head(adapted.model)
    assert head is not None and adapted.sat.head
    prompts = [adapted.tokenizer.encode(p) for p in PROMPTS]
    chained = generate(adapted, make_sequences(adapted, prompts, 48), num_sat=5, two_step=True)
    delattr(adapted.model, HEAD_ATTR)
    try:
        alone = generate(adapted, make_sequences(adapted, prompts, 48), num_sat=5, two_step=True)
    finally:
        setattr(adapted.model, HEAD_ATTR, head)
    assert [s.output_ids for s in chained] == [s.output_ids for s in alone]
    assert sum(s.stats.accepted for s in chained) > sum(s.stats.accepted for s in alone)


def test_a_tree_through_the_shipped_head_accepts_more_and_stays_lossless(pair):
    """The two-step iteration verifying a draft tree whose branches are the shipped head's
    guesses given their parents: the same output as plain greedy decoding in fp32, and more
    drafts accepted per iteration than the head's chain."""
    adapted, base = pair
    prompts = [adapted.tokenizer.encode(p) for p in PROMPTS]
    plain = generate(base, make_sequences(base, prompts, 48))
    chain = generate(adapted, make_sequences(adapted, prompts, 48), num_sat=5, two_step=True)
    tree = generate(adapted, make_sequences(adapted, prompts, 48), num_sat=5, tree="3,2,1,1,1", two_step=True)
    assert [s.output_ids for s in tree] == [s.output_ids for s in plain]
    per_iteration = lambda seqs: sum(s.stats.accepted for s in seqs) / sum(s.stats.iterations for s in seqs)  # noqa: E731
    assert per_iteration(tree) > per_iteration(chain)


def test_the_default_decoder_with_the_shipped_head_and_its_alternatives_is_lossless(pair):
    """The default (scheduled) decoder where every node is free, so the head's alternatives to
    each first pending draft are always verified: fp32 output equals plain greedy, and some
    path through an alternative is accepted."""
    from sdsat.decode.scheduler import Scheduler

    adapted, base = pair
    prompts = [adapted.tokenizer.encode(p) for p in PROMPTS]
    plain = generate(base, make_sequences(base, prompts, 48))
    scheduler = Scheduler(lambda rows, q: 1.0, explore_fraction=0.5, explore_every=3)
    scheduler.total_s = 1e9
    right = []  # per scored row: whether one of its alternatives was the token emitted after the root
    scored = scheduler.acceptance.observe_alt
    scheduler.acceptance.observe_alt = lambda alts, first, *a, **kw: right.append(first in alts) or scored(alts, first, *a, **kw)
    seqs = generate(adapted, make_sequences(adapted, prompts, 48), num_sat=5, lookup=0, scheduler=scheduler)
    assert [s.output_ids for s in seqs] == [s.output_ids for s in plain]
    # every node is verified and there is no lookup: a right alternative was an accepted path
    assert any(right)
