"""The SAT gate: chooses the faster arm by measured tokens per second; never changes the output."""

from __future__ import annotations

import pytest

from sdsat.gate import LOOKUP, SAT, SatGate
from sdsat.generate import generate, make_sequences
from tests.conftest import hf_greedy, tiny_loaded


def drive(gate: SatGate, seconds: dict[str, float], decisions: int) -> list[str]:
    """Decisions each followed by one ordinary pass; an arm's decision yields 3 tokens in
    seconds[arm] (+ a 1-token, 1-second pass after it)."""
    chosen = []
    for _ in range(decisions):
        arm = gate.choose()
        chosen.append(arm)
        gate.after_pass(arm, 3, seconds[arm])
        gate.after_pass(None, 1, 1.0)
    return chosen


def test_warmup_tries_both_arms_then_the_faster_wins_with_exploration():
    gate = SatGate(explore_every=8, warmup=3)
    chosen = drive(gate, {SAT: 1.0, LOOKUP: 3.0}, 64)
    assert chosen[:6].count(SAT) == 3 and chosen[:6].count(LOOKUP) == 3
    later = chosen[6:]
    assert later.count(LOOKUP) == sum(1 for i in range(7, 65) if i % 8 == 0)  # only exploring steps
    assert gate.best() == SAT and gate.rate(SAT) == pytest.approx(4 / 2.0)


def test_the_choice_follows_a_change_in_speed():
    gate = SatGate(explore_every=4, warmup=2, decay=0.8)
    drive(gate, {SAT: 1.0, LOOKUP: 3.0}, 40)
    assert gate.best() == SAT
    drive(gate, {SAT: 9.0, LOOKUP: 1.0}, 80)
    assert gate.best() == LOOKUP


def test_a_decision_is_scored_with_the_pass_after_it():
    gate = SatGate(warmup=1)
    gate.after_pass(SAT, 2, 1.0)
    assert gate.counts[SAT] == 0  # open until the next pass
    gate.after_pass(LOOKUP, 5, 2.0)  # closes SAT (2 + 5 tokens in 3 s), opens LOOKUP
    assert gate.rate(SAT) == pytest.approx(7 / 3.0) and gate.counts[LOOKUP] == 0
    gate.reset_pending()  # the batch emptied: LOOKUP's decision is dropped, not scored
    gate.after_pass(None, 1, 1.0)
    assert gate.counts[LOOKUP] == 0 and gate.rate(LOOKUP) is None


def test_bad_gate_settings_are_refused():
    with pytest.raises(ValueError, match="explore_every"):
        SatGate(explore_every=1)
    with pytest.raises(ValueError, match="decay"):
        SatGate(decay=0.0)


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
