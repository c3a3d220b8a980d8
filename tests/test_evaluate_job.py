"""jobs/evaluate.py end to end (tiny checkpoints fast, the default model slow) and
``jobs/finetune.py --eval`` on a real local Ray cluster."""

from __future__ import annotations

import json
import os

import pytest
import ray
import torch

from jobs.evaluate import main as evaluate
from jobs.finetune import main as finetune
from sdsat.model.load import load_model, save_model
from sdsat.model.sat import SATConfig
from tests.test_finetune_config import save_tiny_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"
TINY_SATS = SATConfig(sat_ids=[250, 251], sat_tokens=["\u00fa", "\u00fb"], num_sat_trained=2)


@pytest.fixture(scope="module")
def tiny_with_sats(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), sat=TINY_SATS)


def test_speed_sweeps_write_json_and_plots_and_cap_k(tiny_with_sats, tmp_path):
    out = tmp_path / "eval.json"
    argv = ["--model", tiny_with_sats, "--limit", "2", "--max-new-tokens", "6", "--k", "1-3", "--batch-sizes", "1,2",
            "--dtype", "float32", "--json", str(out)]
    assert evaluate(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python jobs/evaluate.py --model") and result["machine"]["cores"] >= 1
    speed = result["speed"]
    assert speed["k_capped_at"] == 2 and [r["k"] for r in speed["across_k"]] == [1, 2]
    assert [r["batch"] for r in speed["across_batch"]] == [1, 2]
    for row in speed["across_k"] + speed["across_batch"]:
        assert row["plain_tokens_per_s"] > 0 and row["sdsat_tokens_per_s"] > 0 and row["tau"] >= 1
    assert len(speed["across_k"][1]["accept_rate_per_offset"]) == 2
    assert sorted(result["plots"]) == ["acceptance_per_offset", "speedup_vs_batch", "speedup_vs_k"]
    for rel in result["plots"].values():
        assert (out.parent / rel).read_bytes()[:8] == PNG
    assert "quality" not in result and len(result["load_average"]) == 2
    assert speed["pass_cost"]["1"] == 1.0


def test_gate_fails_a_checkpoint_made_worse_on_purpose(tiny_with_sats, tmp_path):
    worse = load_model(tiny_with_sats, dtype="float32")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in worse.model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.5)
    worse_dir = save_model(worse, tmp_path / "worse")
    out = tmp_path / "gate.json"
    argv = ["--model", str(worse_dir), "--base", tiny_with_sats, "--no-speed", "--gate-problems", "2",
            "--gate-max-new-tokens", "8", "--json", str(out)]
    assert evaluate(argv) == 1
    verdict = json.loads((worse_dir / "quality_gate.json").read_text())
    assert verdict["passed"] is False and any("log-likelihood" in r for r in verdict["reasons"])
    assert len(verdict["export"]["completions"]) == 2
    summary = json.loads(out.read_text())["quality"]
    assert summary["passed"] is False and "completions" not in summary["export"]


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        evaluate(["--no-speed"])
    assert "nothing to do" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate(["--k", "1,x"])


@pytest.mark.slow
def test_default_model_smoke_run_caps_k_at_its_five_sats(tmp_path):
    out = tmp_path / "eval.json"
    argv = ["--limit", "1", "--max-new-tokens", "8", "--k", "1-8", "--batch-sizes", "1", "--json", str(out)]
    assert evaluate(argv) == 0
    speed = json.loads(out.read_text())["speed"]
    assert speed["k_capped_at"] == 5 and [r["k"] for r in speed["across_k"]] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_default_artifact_shows_exactly_no_change_against_its_base(tmp_path):
    """The shipped artifact is a SAT adapter: the base model's own outputs are untouched."""
    out = tmp_path / "gate.json"
    argv = ["--model", "default", "--base", "default-base", "--no-speed", "--gate-problems", "3",
            "--gate-max-new-tokens", "96", "--json", str(out)]
    assert evaluate(argv) == 0
    quality = json.loads(out.read_text())["quality"]
    assert quality["passed"] and quality["pass_drop_points"] == 0.0 and quality["loglik_drop"] == 0.0
    assert quality["changed_completions"] == 0 and quality["base"]["loglik"] == quality["export"]["loglik"]
    assert quality["base"]["loglik_tokens"] > 300


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_finetune_eval_gates_a_sat_adapter_export_with_no_change(ray_cluster, tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    argv = ["--config", "none", "--model", base, "--storage-path", str(tmp_path / "runs"), "--name", "gated", "--num-sat", "2",
            "--row-len", "32", "--max-texts", "4", "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "0",
            "--eval-every", "0", "--precision", "fp32", "--train", "sat_adapter", "--adapter-rank", "2",
            "--lr", "1e-2", "--eval", "2"]
    assert finetune(argv) == 0
    verdict = json.loads((tmp_path / "runs" / "gated" / "export" / "quality_gate.json").read_text())
    assert verdict["passed"] and verdict["loglik_drop"] == 0.0 and verdict["changed_completions"] == 0
    assert verdict["base"]["completions"] == verdict["export"]["completions"]
