"""Per-step counts of drafts verified and accepted, per source and position (serving metrics)."""

from __future__ import annotations

import pytest

from sdsat.decode.batch import Batch
from sdsat.decode.draft_counts import LOOKUP, SAT, DraftCounts
from sdsat.decode.generate import generate, make_sequences, oracle_drafts
from sdsat.decode.scheduler import Scheduler
from tests.conftest import tiny_loaded

PROMPTS = [[5, 6, 7, 8, 9, 10] * 4, [40, 41, 42] * 6 + [40], [100, 101, 102, 103]]
NEW = 24
FREE = lambda rows, q: 1.0  # noqa: E731  (an injected pass cost: drafting always pays)


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded("llama", k=4)


def run(tiny, seqs, fused: bool = False, **step) -> DraftCounts:
    """Decode to the end (fused: scheduled passes with lookup tries); the steps' counts added up."""
    batch = Batch(tiny.model, tiny.tokenizer, tiny.sat.unique_ids, scheduler=Scheduler(FREE) if fused else None)
    batch.add(seqs)
    total = DraftCounts()
    while len(batch):
        if fused:
            batch.scheduled_step(tiny.require_sat(4), lookup=8)
        else:
            batch.step(tiny.require_sat(4), **step)
        for kind in ("verified", "accepted"):
            for source, counts in getattr(batch.counts, kind).items():
                for position, n in enumerate(counts, start=1):
                    total.add(kind, source, position, n)
    return total


def check_consistent(total: DraftCounts) -> None:
    for source, accepted in total.accepted.items():
        verified = total.verified[source]
        assert all(a <= v for a, v in zip(accepted, verified)), (source, accepted, verified)
        assert accepted == sorted(accepted, reverse=True)  # an accepted draft's parent was accepted


def test_fused_counts_credit_lookup_and_sat_drafts(tiny):
    seqs = make_sequences(tiny, PROMPTS, NEW, eos=False)
    total = run(tiny, seqs, fused=True)
    check_consistent(total)
    assert total.total("accepted") == sum(s.stats.accepted for s in seqs) > 0
    assert sum(total.accepted.get(LOOKUP, [])) > 0  # repetitive prompts: lookup drafts get accepted
    assert sum(total.verified[SAT]) > 0 and sum(total.verified[LOOKUP]) > 0


def test_two_step_counts_k_drafts_per_row_and_oracle_acceptance(tiny):
    refs = [s.output_ids for s in generate(tiny, make_sequences(tiny, PROMPTS, NEW, eos=False))]
    seqs = make_sequences(tiny, PROMPTS, NEW, eos=False)
    total = run(tiny, seqs, draft_override=oracle_drafts({s.seq_id: r for s, r in zip(seqs, refs)}))
    check_consistent(total)
    assert set(total.verified) == {SAT} and len(set(total.verified[SAT])) == 1 and len(total.verified[SAT]) == 4
    steps = total.verified[SAT][0]  # one draft per position per row per step
    assert total.accepted[SAT][0] == steps  # oracle drafts: the first one is always right
    assert total.total("accepted") == sum(s.stats.accepted for s in seqs)


def test_plain_steps_count_nothing(tiny):
    batch = Batch(tiny.model, tiny.tokenizer, tiny.sat.unique_ids)
    batch.add(make_sequences(tiny, PROMPTS, 4, eos=False))
    batch.step([])
    assert batch.counts == DraftCounts()
