"""jobs/finetune.py --no-ray: the whole run (data, training, checkpoints, export, resume) in
this process with one worker, for a lone machine without Ray; and the default model from a
local GGUF copy (a machine without a package registry)."""

from __future__ import annotations

import shutil

import pytest

from jobs.finetune import main
from sdsat.model import default_model
from sdsat.training.checkpoint import checkpoint_dirs, is_complete, read_state
from tests.test_finetune import RUN, _assert_lossless
from sdsat.model.load import load_model
from tests.test_finetune_config import save_tiny_checkpoint

LOCAL = [*RUN, "--num-workers", "1", "--no-ray"]  # the later --num-workers wins


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base"))


def test_no_ray_run_checkpoints_exports_and_resumes(tiny_path, tmp_path):
    args = ["--model", tiny_path, "--storage-path", str(tmp_path), "--name", "local", *LOCAL, "--keep-checkpoints", "2"]
    assert main(args) == 0
    run = tmp_path / "local"
    assert sorted(read_state(d)["step"] for d in checkpoint_dirs(run)) == [4, 6]  # every 2 steps, the newest 2 kept
    assert all(is_complete(d) for d in checkpoint_dirs(run))
    assert not [p for p in run.iterdir() if p.name.startswith(".writing")]
    assert (run / "training_curve.png").is_file() and (run / "metrics.jsonl").is_file()
    exported = load_model(str(run / "export"), dtype="float32")
    assert exported.sat.num_sat_trained == 4
    _assert_lossless(exported)

    # A run stopped after step 4 (its last checkpoint gone) continues there when started again.
    shutil.rmtree(run / "checkpoint_000006")
    assert main(args) == 0
    assert sorted(read_state(d)["step"] for d in checkpoint_dirs(run)) == [4, 6]
    assert read_state(run / "checkpoint_000006")["samples"] == 6 * 2  # 6 steps of 2 rows, none seen twice

    # A later run continues a finished one (resume_from) on its own schedule.
    assert main([*args, "--name", "later", "--resume-from", str(run), "--max-steps", "8"]) == 0
    assert [read_state(d)["samples"] for d in checkpoint_dirs(tmp_path / "later")] == [8 * 2]


@pytest.mark.parametrize("flags, message", [
    (["--num-workers", "2"], "one worker"),
    (["--strategy", "fsdp"], "strategy ddp"),
])
def test_no_ray_refuses_what_it_cannot_do(tiny_path, tmp_path, capsys, flags, message):
    assert main(["--model", tiny_path, "--storage-path", str(tmp_path), "--name", "bad", *LOCAL, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before the run directory or any checkpoint


def test_no_ray_without_a_gpu_refuses_use_gpu(tiny_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["--model", tiny_path, "--storage-path", str(tmp_path), "--name", "gpu", *LOCAL, "--use-gpu", "true"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_the_default_gguf_from_a_local_copy_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(default_model.GGUF_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(RuntimeError, match="no such file"):
        default_model._local_gguf()
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"GGUF not the model")
    monkeypatch.setenv(default_model.GGUF_ENV, str(wrong))
    with pytest.raises(RuntimeError, match="expected " + default_model.GGUF_SHA256):
        default_model._local_gguf()


def test_no_ray_run_distils_in_process(tiny_path, tmp_path):
    """Self-distillation runs in this process (no Ray tasks) and its rows are what trains."""
    import json

    cache = tmp_path / "rows.json"
    assert main(["--model", tiny_path, "--storage-path", str(tmp_path), "--name", "distil", *LOCAL, "--max-steps", "2",
                 "--distill-max-new-tokens", "8", "--distill-prompt-len", "6", "--distill-rows", "4",
                 "--distill-cache", str(cache)]) == 0
    rows = json.loads(cache.read_text())
    assert len(rows) == 4 and all(len(r) == 6 + 8 for r in rows)
    assert read_state(tmp_path / "distil" / "checkpoint_000002")["samples"] == 2 * 2
