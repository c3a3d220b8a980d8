"""jobs/distill_rows.py: the rows a later stage's fine-tuning reads as its distill_cache."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from jobs.distill_rows import main
from sdsat.model.load import load_model, resolve_path
from sdsat.training.data import self_distill
from sdsat.training.distill import sampling_for, work_items
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model with the default model's tokenizer, saved as a checkpoint directory."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_model(vocab=49152).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_path("default-base")).save_pretrained(path)
    return path


def test_the_job_writes_greedy_rows_then_sampled_ones_as_fine_tuning_seeds_them(tiny, tmp_path):
    prompts = [[100 + i, 200 + i, 300 + i, 400 + i] for i in range(3)]
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    out = tmp_path / "rows.json"
    assert main(["--prompts", str(tmp_path / "p.json"), "--model", str(tiny), "--out", str(out),
                 "--max-new-tokens", "8", "--dtype", "float32", "--device", "cpu", "--sampled", "1", "--temperature", "0.9"]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 6 and [r[:4] for r in rows] == prompts + prompts
    loaded = load_model(str(tiny), dtype="float32")
    items = work_items(prompts, 1)
    assert rows == self_distill(loaded, prompts + prompts, 8, sampling=sampling_for(items, 0.9, 0))
    assert rows[:3] == self_distill(loaded, prompts, 8)  # greedy first
    with pytest.raises(SystemExit):
        main(["--prompts", str(tmp_path / "p.json"), "--model", str(tiny), "--out", str(out), "--sampled", "-1"])


def test_reused_greedy_rows_are_not_made_again_and_the_output_is_the_same(tiny, tmp_path):
    prompts = [[100 + i, 200 + i, 300 + i] for i in range(4)]
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    (tmp_path / "some.json").write_text(json.dumps(prompts[2:] + prompts[:1]))
    args = ["--model", str(tiny), "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu"]
    main(["--prompts", str(tmp_path / "some.json"), "--out", str(tmp_path / "greedy.json"), *args])
    main(["--prompts", str(tmp_path / "p.json[0:4]"), "--sampled", "1", "--out", str(tmp_path / "all.json"), *args])
    greedy = json.loads((tmp_path / "greedy.json").read_text())
    doctored = [row[:3] + [7] * 6 for row in greedy]  # reused rows are taken as they are, not made again
    (tmp_path / "doctored.json").write_text(json.dumps(doctored))
    main(["--prompts", str(tmp_path / "p.json"), "--sampled", "1", "--reuse", str(tmp_path / "doctored.json"),
          "--out", str(tmp_path / "reused.json"), *args])
    everything, reused = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("all", "reused"))
    assert len(everything) == len(reused) == 8
    assert reused[2:4] == doctored[:2] and reused[0] == doctored[2]
    assert reused[1] == everything[1] and reused[4:] == everything[4:]
    assert everything[2:4] == greedy[:2]


def test_an_interrupted_run_continues_from_its_partial_file(tiny, tmp_path):
    prompts = [[100 + i, 200 + i, 300 + i] for i in range(5)]
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    args = ["--prompts", str(tmp_path / "p.json"), "--model", str(tiny), "--max-new-tokens", "6",
            "--dtype", "float32", "--device", "cpu", "--sampled", "1", "--batch-size", "2"]
    main([*args, "--out", str(tmp_path / "whole.json")])
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert not (tmp_path / "whole.json.partial").exists()
    # a run stopped after 3 rows left them behind; its rerun makes only the other 7
    (tmp_path / "rerun.json.partial").write_text(json.dumps(whole[:2] + [whole[2][:3] + [9] * 6]))
    main([*args, "--out", str(tmp_path / "rerun.json")])
    rerun = json.loads((tmp_path / "rerun.json").read_text())
    assert rerun[:2] == whole[:2] and rerun[2] == whole[2][:3] + [9] * 6 and rerun[3:] == whole[3:]
    assert not (tmp_path / "rerun.json.partial").exists()
