"""jobs/bench.py end to end on a tiny random model: lockstep timing (plain and SDSAT batches
taking turns pass by pass) times both sides and decodes exactly what separate runs decode."""

from __future__ import annotations

import json

import jobs.bench as bench
from tests.conftest import tiny_loaded

PROMPTS = ["def f(x):\n    return x + x + x\n", "the cat sat on the mat, the cat sat", "SELECT a, b FROM t", "abcabcabcabc"]


def _bench(monkeypatch, tmp_path, timing: str) -> dict:
    loaded = tiny_loaded("llama", k=5)
    monkeypatch.setattr(bench, "load_model", lambda *args, **kwargs: loaded)
    monkeypatch.setattr(bench, "load_prompts", lambda spec: PROMPTS)
    out = tmp_path / f"{timing}.json"
    bench.main([
        "--model", "tiny", "--num-sat", "5", "--max-new-tokens", "24", "--batch-size", "2", "--dtype", "float32",
        "--calibration-budget", "0.2", "--rounds", "2", "--timing", timing, "--device", "cpu", "--json", str(out),
    ])
    return json.loads(out.read_text())


def test_lockstep_timing_decodes_as_separate_runs_do_and_times_both_sides(monkeypatch, tmp_path):
    lockstep = _bench(monkeypatch, tmp_path, "lockstep")
    runs = _bench(monkeypatch, tmp_path, "runs")
    assert lockstep["timing"] == "lockstep" and runs["timing"] == "alternating runs"
    for r in (lockstep, runs):
        assert r["identical"] and r["token_match_rate"] == 1.0  # fp32: exactly plain greedy
        assert r["plain_tokens_per_s"] > 0 and r["sdsat_tokens_per_s"] > 0
        assert len(r["speedup_per_round"]) == 2
    # the same prompts, decoded to the same number of tokens either way
    assert lockstep["tau"] >= 1.0 and lockstep["scheduler"]["passes"] > 0
