"""jobs/gpu_check.py's CPU smoke mode: every measurement runs and the JSON holds it."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.gpu_check import main


def test_small_gpu_check_writes_every_measurement(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--small", "--device", "cpu", "--batches", "1,4", "--out", str(tmp_path / "check.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "check.json").read_text())
    small = report["shapes"]["small"]
    for dtype in ("fp32", "bf16"):
        for drafts in ("oracle", "wrong"):
            result = small[f"lossless_{dtype}"][drafts]
            # fp32 must be exact; in bf16 any divergence must be a near-tie of the plain model
            assert result["equal_rows"] == result["rows"] == 4 or (
                dtype == "bf16" and all(d["near_tie"] for d in result["divergences"]))
    assert [s["batch"] for s in small["speed_bf16"]] == [1, 4]
    for run in small["speed_bf16"]:
        assert run["plain_tok_s"] > 0 and run["sdsat_tok_s"] > 0
        assert run["tau"] > 1  # oracle drafts are accepted
    assert small["pass_cost_bf16"]["relative"]["1"] == 1.0 and "6" in small["pass_cost_bf16"]["relative"]
    assert small["weight_floor_ms"] > 0
    assert [(f["train"], f["strategy"]) for f in report["finetune"]] == [("full", "fsdp"), ("sat_adapter", "ddp")]
    assert report["finetune"][0]["wrapped_as"].startswith("FSDP")  # the job's own FSDP wrapping, over one rank
    assert all(f["tokens_per_s"] > 0 and f["loss"] > 0 for f in report["finetune"])
    assert not torch.distributed.is_initialized()  # its one-process group is gone


def test_real_shapes_refuse_a_cpu(capsys):
    with pytest.raises(SystemExit):
        main(["--dummy-weights", "--device", "cpu"])
    assert "need a GPU" in capsys.readouterr().err
