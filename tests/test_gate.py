"""The SAT gate: chooses the faster arm by measured tokens per second; never changes the output."""

from __future__ import annotations

import pytest

from sdsat.decode.gate import LOOKUP, SAT, SatGate
from sdsat.decode.generate import generate, make_sequences
from tests.conftest import hf_greedy, tiny_loaded


def drive(gate: SatGate, sat_seconds: float, gain: int, decisions: int) -> list[str]:
    """Decisions each followed by one ordinary pass (2 tokens, 1 s). A LOOKUP decision pass
    takes 1 s, a SAT one ``sat_seconds``; the pass after a SAT decision gains ``gain`` tokens."""
    chosen = []
    for _ in range(decisions):
        arm = gate.choose()
        chosen.append(arm)
        gate.after_pass(arm, 1, sat_seconds if arm == SAT else 1.0)
        extra = gain if arm == SAT else 0
        gate.after_pass(None, 2 + extra, 1.0, sat_gain=extra)
    return chosen


def test_warmup_tries_both_arms_then_the_better_wins_with_exploration():
    gate = SatGate(explore_every=8, warmup=3)
    # SAT: +0.1 s for +2 tokens, at ~1.5 tokens/s: worth it
    chosen = drive(gate, 1.1, 2, 64)
    assert chosen[:6].count(SAT) == 3 and chosen[:6].count(LOOKUP) == 3
    later = chosen[6:]
    assert later.count(LOOKUP) == sum(1 for i in range(7, 65) if i % 8 == 0)  # only exploring decisions
    assert gate.best() == SAT and gate.gain == pytest.approx(2) and gate.seconds[SAT] == pytest.approx(2.1)


def test_a_gain_not_worth_its_time_loses():
    gate = SatGate(explore_every=8, warmup=3)
    chosen = drive(gate, 2.0, 1, 64)  # +1 s for +1 token, at ~1.5 tokens/s
    assert gate.best() == LOOKUP and chosen[6:].count(SAT) == sum(1 for i in range(7, 65) if i % 8 == 0)


def test_the_choice_follows_a_change_in_gain():
    gate = SatGate(explore_every=4, warmup=2, smoothing=0.3)
    drive(gate, 1.1, 2, 40)
    assert gate.best() == SAT
    drive(gate, 1.1, 0, 80)  # the SAT drafts stopped being accepted
    assert gate.best() == LOOKUP


def test_a_decision_is_scored_with_the_pass_after_it():
    gate = SatGate(warmup=1)
    gate.after_pass(SAT, 1, 1.0)
    assert gate.counts[SAT] == 0 and gate.gain is None  # open until the next pass
    gate.after_pass(LOOKUP, 4, 2.0, sat_gain=3)  # scores SAT (3 s, gain 3), opens LOOKUP
    assert gate.seconds[SAT] == pytest.approx(3.0) and gate.gain == 3 and gate.counts[LOOKUP] == 0
    assert gate.rate() == pytest.approx((1 * 0.99 + 4) / (1 * 0.99 + 2))
    gate.reset_pending()  # the batch emptied: LOOKUP's decision is dropped, not scored
    gate.after_pass(None, 1, 1.0)
    assert gate.counts[LOOKUP] == 0 and gate.seconds[LOOKUP] is None


def test_bad_gate_settings_are_refused():
    with pytest.raises(ValueError, match="explore_every"):
        SatGate(explore_every=1)
    with pytest.raises(ValueError, match="smoothing"):
        SatGate(smoothing=0.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoding_with_a_gate_is_plain_greedy(arch):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3, 4, 5, 3, 4, 5, 3]]
    loaded = tiny_loaded(arch, k=8)
    refs = [hf_greedy(loaded, p, 40) for p in prompts]
    gate = SatGate(explore_every=3, warmup=2)
    for _ in range(2):  # the gate carries over from one call to the next
        seqs = generate(loaded, make_sequences(loaded, prompts, 40, eos=False), 4, fused=True, lookup=6,
                        lookup_first=True, gate=gate)
        assert [s.output_ids for s in seqs] == refs
    assert gate.counts[SAT] >= 2 and gate.counts[LOOKUP] >= 2


def test_walk_counts_the_truth_prefix_that_is_a_trie_path():
    from sdsat.decode.batch import _walk

    trie = ([8, 9, 7, 2], [-1, 0, -1, 1])  # 8 -> 9 -> 2, and 7
    assert _walk(trie, [8, 9, 2, 5]) == 3 and _walk(trie, [7, 1]) == 1 and _walk(trie, [9]) == 0
    assert _walk(([], []), [1, 2]) == 0 and _walk(trie, []) == 0


def test_the_sat_gain_is_what_the_sat_drafts_were_accepted_for():
    """SAT drafts alone (no lookup): every accepted draft is the SAT drafts' gain."""
    from sdsat.decode.batch import Batch

    class Recording(SatGate):
        def __init__(self):
            super().__init__(explore_every=2, warmup=1)
            self.passes = []

        def after_pass(self, arm, tokens, seconds, sat_gain=0):
            self.passes.append((tokens, sat_gain))
            super().after_pass(arm, tokens, seconds, sat_gain)

    loaded = tiny_loaded("llama", k=8)
    gate = Recording()
    batch = Batch(loaded.model, banned_ids=loaded.sat.unique_ids, gate=gate)
    seqs = make_sequences(loaded, [[3, 4, 5, 3, 4, 5, 3], [12, 13]], 40, eos=False)
    batch.add(seqs)
    while len(batch):
        events = batch.step(loaded.sat.ids_for(4), fused=True)
        assert gate.passes[-1][1] == sum(len(e.new_ids) for e in events) - len(events) or any(e.sequence.finished for e in events)
    assert sum(g for _, g in gate.passes) > 0
