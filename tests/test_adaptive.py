"""Adaptive k with hand-made timings and acceptance rates; start-up calibration on a tiny model."""

from __future__ import annotations

import pytest

import asyncio

from sdsat.decode.adaptive import (
    AdaptiveK,
    bucket,
    calibration_sizes,
    choose_k,
    expected_tokens,
    interpolate,
    interpolate_times,
)
from sdsat.decode.calibrate import calibrate
from sdsat.engine.engine import Engine, EngineConfig, Request
from sdsat.decode.generate import generate, make_sequences
from tests.conftest import tiny_loaded


def test_expected_tokens():
    assert expected_tokens([0.9, 0.5], 0) == 1.0
    assert expected_tokens([0.9, 0.5], 1) == pytest.approx(2.9)
    assert expected_tokens([0.9, 0.5], 2) == pytest.approx(2 + 0.9 + 0.45)
    assert expected_tokens([0.0, 1.0, 1.0], 3) == 2.0  # nothing past a rejected offset counts


def test_expected_tokens_of_the_fused_iteration():
    # One token with nothing accepted; lookup drafts reach past k.
    assert expected_tokens([0.9, 0.5], 2, base=1.0) == pytest.approx(1 + 0.9 + 0.45)
    assert expected_tokens([0.5, 0.5, 0.5], 1, base=1.0, reach=3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_fused_adaptive_tracks_acceptance_up_to_the_lookup_length():
    adaptive = AdaptiveK(2, fused=True, lookup=4, prior=(0.0, 1.0))
    assert len(adaptive.acceptance()) == 4
    adaptive.observe(1, 2, 0.01, [4])  # a lookup chain of 4 accepted at k = 2
    assert all(a > 0 for a in adaptive.acceptance())
    # Plain: 1 token per time unit. Fused k=1: 1.5 units for 1 + 0.4 (+ 0.16 + ... with lookup).
    assert choose_k({0: 1.0, 1: 1.5}, [0.4] * 4, base=1.0, lookup=4) == 1  # 1.65 tokens
    assert choose_k({0: 1.0, 1: 1.5}, [0.4] * 4, base=1.0, lookup=0) == 0  # 1.4 tokens


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


def test_choose_k_needs_a_margin_over_plain():
    # k=1: 2.5 tokens / 0.048 s = 52.1/s against plain 1 / 0.02 = 50/s: 4% better.
    times, accept = {0: 0.020, 1: 0.048}, [0.5]
    assert choose_k(times, accept) == 1
    assert choose_k(times, accept, margin=0.05) == 0  # within the noise: plain
    assert choose_k(times, accept, margin=0.03) == 1


def test_interpolate_over_batch_sizes():
    assert interpolate({1: 1.0, 4: 4.0}, 2) == 2.0
    assert interpolate({1: 1.0, 4: 4.0}, 9) == 4.0  # flat beyond
    assert interpolate({4: 4.0}, 1) == 4.0


def test_times_interpolate_between_measured_batch_sizes():
    adaptive = AdaptiveK(2)
    for size, k, t in [(1, 0, 0.02), (16, 0, 0.05), (1, 2, 0.05), (16, 2, 0.20)]:
        adaptive.observe(size, k, t, accepted=[])
    times = adaptive.times(8)
    assert times[0] == pytest.approx(0.02 + 0.03 * 7 / 15)
    assert times[2] == pytest.approx(0.05 + 0.15 * 7 / 15)
    assert times[1] == times[2]  # k=1 never measured: flat in k below the measured k=2
    # 9-16 has a measurement for k = 0 and 2 but none for k = 1 yet: measure it first
    assert adaptive.propose(12) == 1


def test_a_time_measured_only_at_small_batches_is_not_stretched_to_large_ones():
    adaptive = AdaptiveK(5)
    for size in (1, 16):  # calibrated: plain, k=1 and k=5 at both ends
        for k, t in {0: 0.02, 1: 0.05, 5: 0.07}.items():
            adaptive.observe(size, k, t * size ** 0.5, accepted=[])
    adaptive.observe(4, 2, 0.08, accepted=[])  # an exploring step at batch 4
    times = adaptive.times(16)
    assert times[2] == pytest.approx(0.05 * 4 + 0.02 * 4 * 1 / 4)  # from k = 1 and 5 at 16, not 0.08
    assert adaptive.times(4)[2] == 0.08


def test_exploring_from_plain_tries_one_sat_less_often_when_it_is_dear():
    adaptive = AdaptiveK(4, explore_every=4, time_ema=0.0)
    times = {0: 0.02, 1: 0.1, 2: 0.13, 4: 0.2}  # drafting never pays; k = 1 costs 5 plain steps
    for k in (0, 1, 4):
        adaptive.observe(1, k, times[k], accepted=[])
    seen = []
    for _ in range(40):
        k = adaptive.propose(1)
        seen.append(k)
        adaptive.observe(1, k, times[k], accepted=[0] if k else [])
    assert set(seen) == {0, 1}  # plain, except the exploring steps, which try k = 1
    assert seen.count(1) == 2  # once in 4 * 5 = 20 steps, not once in 4


def test_calibration_sizes():
    assert calibration_sizes(1) == [1]
    assert calibration_sizes(16) == [1, 2, 4, 8, 16]
    assert calibration_sizes(12) == [1, 2, 4, 8, 12]


def test_calibrate_fills_every_bucket_and_leaves_acceptance_alone():
    loaded = tiny_loaded("llama", k=4)
    adaptive = AdaptiveK(4)
    before = adaptive.acceptance()
    calibrate(loaded, adaptive, 8, banned=loaded.sat.unique_ids, pad_id=0, repeats=2)
    assert {key for key in adaptive.step_seconds} == {(s, k) for s in (1, 2, 4, 8) for k in (0, 1, 4)}
    assert all(t > 0 for t in adaptive.step_seconds.values())
    assert adaptive.acceptance() == before  # dummy drafts say nothing about real ones
    for size in range(1, 9):  # no first measurement left for live traffic
        assert all(adaptive._measured_near(size, k) for k in (0, 1, 4))


def test_engine_calibrates_before_serving_and_stays_exact():
    loaded = tiny_loaded("llama", k=4)
    prompt = [5, 6, 7]

    async def main():
        engine = Engine(loaded, EngineConfig(num_sat=4, max_batch_size=4))
        try:
            out = [c async for c in engine.generate(Request(prompt, max_new_tokens=12))]
            return out, engine.snapshot()
        finally:
            await engine.shutdown()

    chunks, snap = asyncio.run(main())
    assert snap["calibration_s"] is not None and snap["calibration_s"] > 0
    ref = generate(loaded, make_sequences(loaded, [prompt], 12), num_sat=0)[0]
    assert [t for c in chunks for t in c.token_ids] == ref.output_ids
