"""jobs/bench.py end to end on a tiny random model: lockstep timing (plain and SDSAT batches
taking turns pass by pass) times both sides and decodes exactly what separate runs decode."""

from __future__ import annotations

import json

import jobs.bench as bench
from tests.conftest import tiny_loaded

PROMPTS = ["def f(x):\n    return x + x + x\n", "the cat sat on the mat, the cat sat", "SELECT a, b FROM t", "abcabcabcabc"]


def _bench(monkeypatch, tmp_path, timing: str, *extra: str) -> dict:
    loaded = tiny_loaded("llama", k=5)
    monkeypatch.setattr(bench, "load_model", lambda *args, **kwargs: loaded)
    monkeypatch.setattr(bench, "load_prompts", lambda spec: PROMPTS)
    out = tmp_path / f"{timing}{len(extra)}.json"
    bench.main([
        "--model", "tiny", "--num-sat", "5", "--max-new-tokens", "24", "--batch-size", "2", "--dtype", "float32",
        "--calibration-budget", "0.2", "--rounds", "2", "--timing", timing, "--device", "cpu", "--json", str(out), *extra,
    ])
    return json.loads(out.read_text())


def test_lockstep_timing_decodes_as_separate_runs_do_and_times_both_sides(monkeypatch, tmp_path):
    lockstep = _bench(monkeypatch, tmp_path, "lockstep")
    runs = _bench(monkeypatch, tmp_path, "runs")
    assert lockstep["timing"] == "lockstep, prefill apart" and runs["timing"] == "alternating runs"
    assert lockstep["prefill_s"]["plain"] > 0 and lockstep["prefill_s"]["sdsat"] > 0 and runs["prefill_s"] is None
    for r in (lockstep, runs):
        assert r["identical"] and r["token_match_rate"] == 1.0  # fp32: exactly plain greedy
        assert r["plain_tokens_per_s"] > 0 and r["sdsat_tokens_per_s"] > 0
        assert len(r["speedup_per_round"]) == 2
    assert lockstep["tau"] >= 1.0 and lockstep["scheduler"]["passes"] > 0


def test_oracle_drafts_decode_whole_runs_against_each_batchs_plain_output(monkeypatch, tmp_path):
    """--oracle-drafts drafts round 0's plain output (the run falls back from lockstep to
    whole runs): every draft of an untrained model is then right, and the output stays exact."""
    r = _bench(monkeypatch, tmp_path, "lockstep", "--oracle-drafts")
    guessed = _bench(monkeypatch, tmp_path, "lockstep", "--two-step", "--rounds", "1")  # the same, drafting with the SATs
    assert r["timing"] == guessed["timing"] == "alternating runs" and r["decoder"] == "two-step"
    assert r["identical"] and guessed["identical"]
    # drafts past a reference's end are wrong, so not all are accepted; random SATs guess almost none
    assert r["accept_rate"] > 0.75 and guessed["accept_rate"] < 0.25


def test_lockstep_flips_which_side_goes_first_after_every_pair(monkeypatch):
    """With a fixed order, the second of two identical plain batches measured slower; the
    order flips after every pair, so whatever following costs falls on both sides alike."""
    loaded = tiny_loaded("llama", k=5)
    calls, stream = [], bench.stream

    def recording(loaded, seqs, k, **kwargs):
        kind = "sdsat" if "scheduler" in kwargs else "plain"
        for step in stream(loaded, seqs, k, **kwargs):
            calls.append(kind)
            yield step

    monkeypatch.setattr(bench, "stream", recording)
    args = bench.parse_args(["--max-new-tokens", "8", "--num-sat", "5"])
    prompt = [loaded.tokenizer.encode("abc abc abc")]
    (plain, _, _), (sdsat, _, _) = bench.run_lockstep(loaded, prompt, args, 5, bench.Scheduler(lambda rows, q: 1.0), plain_first=False)
    assert plain == sdsat  # fp32: exactly plain greedy
    pairs = [tuple(calls[i : i + 2]) for i in range(0, 8, 2)]
    assert pairs == [("sdsat", "plain"), ("plain", "sdsat"), ("sdsat", "plain"), ("plain", "sdsat")]
