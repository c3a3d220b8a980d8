"""Adaptive k with hand-made timings and acceptance rates."""

from __future__ import annotations

import pytest

from sdsat.adaptive import AdaptiveK, bucket, choose_k, expected_tokens, interpolate_times


def test_expected_tokens():
    assert expected_tokens([0.9, 0.5], 0) == 1.0
    assert expected_tokens([0.9, 0.5], 1) == pytest.approx(2.9)
    assert expected_tokens([0.9, 0.5], 2) == pytest.approx(2 + 0.9 + 0.45)
    assert expected_tokens([0.0, 1.0, 1.0], 3) == 2.0  # nothing past a rejected offset counts


def test_choose_k_trades_acceptance_against_time():
    accept = [0.8, 0.7, 0.6, 0.5]
    # A GPU-like server: wider passes cost little, so drafting all 4 wins.
    gpu = {0: 0.020, 1: 0.041, 2: 0.041, 3: 0.042, 4: 0.042}
    assert choose_k(gpu, accept) == 4
    # A big batch: each extra token per pass costs a lot, so plain decoding wins.
    # k=1: 2.8 tokens / 0.090 s = 31/s; plain: 1 / 0.025 = 40/s.
    big = {0: 0.025, 1: 0.090, 2: 0.130, 3: 0.170, 4: 0.210}
    assert choose_k(big, accept) == 0
    # Acceptance collapses: SDSAT yields 2 tokens per 2 passes, never beats one plain pass.
    assert choose_k(gpu, [0.0] * 4) == 0
    # Middle ground: k=2 gives 3.36 tokens / 0.06 s = 56/s, more than k=4 (3.97 / 0.09 = 44/s) or plain (40/s).
    mid = {0: 0.025, 1: 0.055, 2: 0.060, 3: 0.075, 4: 0.090}
    assert choose_k(mid, accept) == 2


def test_choose_k_breaks_ties_toward_smaller_k_and_needs_data():
    assert choose_k({0: 0.01, 1: 0.02}, [0.0]) == 0  # 1 token / 0.01 s == 2 tokens / 0.02 s
    with pytest.raises(ValueError):
        choose_k({}, [0.5])


def test_interpolate_times():
    out = interpolate_times({0: 1.0, 1: 2.0, 5: 6.0}, 6)
    assert out == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0, 5: 6.0, 6: 6.0}
    assert interpolate_times({0: 1.0}, 3) == {0: 1.0}


def test_bucket():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [0, 1, 2, 2, 3, 3, 4, 4, 5]


def test_adaptive_measures_then_exploits_then_explores():
    adaptive = AdaptiveK(4, explore_every=10)
    times = {0: 0.02, 1: 0.041, 2: 0.041, 3: 0.042, 4: 0.042}  # a server where drafting is cheap
    seen = []
    for _ in range(30):
        k = adaptive.propose(batch_size=1)
        seen.append(k)
        adaptive.observe(1, k, times[k], accepted=[min(k, 3)])  # rows accept 3 drafts
    assert seen[:3] == [0, 1, 4]  # measure plain, k=1 and k_max first
    assert seen[9] != 4 or seen[19] != 4  # explores now and then (seeded)
    exploit = [k for i, k in enumerate(seen[3:], start=3) if i % 10 != 9]
    assert set(exploit) == {4}
    p = adaptive.acceptance()
    assert p[0] > 0.9 and p[2] > 0.9 and p[3] < 0.3  # offset 4 is always rejected


def test_adaptive_falls_back_to_plain_when_acceptance_falls():
    adaptive = AdaptiveK(4, explore_every=0, accept_decay=0.8)
    times = {0: 0.02, 1: 0.041, 2: 0.041, 3: 0.042, 4: 0.042}
    for _ in range(5):
        k = adaptive.propose(1)
        adaptive.observe(1, k, times[k], accepted=[k])  # everything accepted: drafting wins
    assert adaptive.propose(1) == 4
    for _ in range(20):
        k = adaptive.propose(1)
        adaptive.observe(1, k, times[k], accepted=[0])  # nothing accepted any more
    assert adaptive.propose(1) == 0


def test_adaptive_lowers_k_as_the_batch_grows():
    adaptive = AdaptiveK(4, explore_every=0)

    def step_time(batch, k):  # per pass: fixed cost + batch * tokens per pass; plain = 1 pass
        per_pass = 0.01 + 0.002 * batch * (k + 1)
        return per_pass if k == 0 else 2 * per_pass

    for batch in (1, 16):
        for _ in range(40):
            k = adaptive.propose(batch)
            adaptive.observe(batch, k, step_time(batch, k), accepted=[min(k, 2)] * batch)
    assert adaptive.propose(1) > adaptive.propose(16)
    assert adaptive.propose(16) == 0
