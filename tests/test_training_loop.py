"""The training loop in one process (no Ray): time budgets, progress lines, precision choice."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from sdsat.training.config import load_config
from sdsat.training.loop import Trainer, Worker
from sdsat.training.precision import choose_bf16, cpu_flags
from sdsat.training.setup import make_scheduler, schedule_of
from tests.test_finetune_config import save_tiny_checkpoint


def loop_config(model: str, tmp_path: Path, **overrides) -> dict:
    values = dict(model=model, num_sat=4, row_len=32, batch_size=2, warmup_steps=1, eval_every=0, precision="fp32",
                  poisson_lambda=4.0, name="run") | overrides
    return {"cfg": load_config(overrides=values).model_dump(), "resume_from": None,
            "export_dir": str(tmp_path / "export"), "run_dir": str(tmp_path / "run")}


def token_rows(n: int = 16, row_len: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, row_len), dtype=np.int32)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base"))


def test_a_time_boxed_run_plans_its_steps_from_measured_speed(tiny_path, tmp_path, caplog):
    config = loop_config(tiny_path, tmp_path, max_steps=100000, max_minutes=0.02)  # 1.2 s of training
    trainer = Trainer(config, Worker(0, 1, torch.device("cpu")), token_rows(), None)
    reported = []
    with caplog.at_level(logging.INFO, logger="sdsat"):
        trainer.fit(lambda metrics, write: reported.append(metrics))
    planned = schedule_of(trainer.scheduler).total
    assert trainer.state["planned"] and 3 <= planned < 100000
    assert reported[-1]["step"] in (planned, planned - 1) or trainer.state["train_s"] >= 1.2
    # The schedule decayed over the planned steps, not over max_steps.
    assert reported[-1]["lr"] < 0.5 * config["cfg"]["lr"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines and all(" tok/s" in line and "eta " in line for line in lines)
    assert any(r.getMessage().startswith("time budget") for r in caplog.records)
    # The training curve: a PNG and the per-step metrics beside the run's checkpoints.
    curve = tmp_path / "run" / "training_curve.png"
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curve.stat().st_size > 10_000
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(reported) + 1))


def test_the_planned_total_is_saved_with_the_scheduler():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, {"warmup_steps": 0, "max_steps": 100, "min_lr_ratio": 0.1})
    schedule_of(scheduler).total = 10
    restored = make_scheduler(optimizer, {"warmup_steps": 0, "max_steps": 100, "min_lr_ratio": 0.1})
    restored.load_state_dict(scheduler.state_dict())
    assert schedule_of(restored).total == 10


@pytest.mark.parametrize(
    "requested, flags, device, expected",
    [
        ("auto", {"avx2", "fma"}, "cpu", False),
        ("auto", {"avx2", "avx512_bf16"}, "cpu", True),
        ("auto", {"amx_bf16"}, "cpu", True),
        ("bf16", {"avx2"}, "cpu", True),  # an explicit choice wins
        ("fp32", {"avx512_bf16"}, "cpu", False),
        ("bfloat16", set(), "cpu", True),
        ("float32", set(), "cpu", False),
    ],
)
def test_precision_is_bf16_only_where_it_runs_natively_unless_overridden(requested, flags, device, expected, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # no kernel cap (tests/test_hardware.py has those)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    bf16, why = choose_bf16(requested, torch.device(device), flags)
    assert bf16 == expected
    if requested == "auto" and not expected:
        assert "emulated" in why


def test_precision_refuses_unknown_values_and_reads_cpuinfo(tmp_path):
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        choose_bf16("fp8", torch.device("cpu"), set())
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_the_recorded_recipe_names_no_machine_paths():
    from sdsat.training.export import recipe

    cfg = load_config("configs/finetune_artifact.yaml", {"storage_path": "/scratch/me/runs", "export_dir": "/tmp/out",
                                                         "distill_cache": "/tmp/rows.json"}).model_dump()
    kept = recipe(cfg)
    assert kept["lr"] == cfg["lr"] and kept["distill_prompts"] == cfg["distill_prompts"]
    paths = [v for v in kept.values() if isinstance(v, str) and (v.startswith(("/", "~")) or "://" in v)]
    assert not paths and not {"name", "storage_path", "export_dir", "distill_cache"} & kept.keys()


def test_validation_in_batches_measures_what_it_measured_one_row_at_a_time(tiny_path, tmp_path):
    """Held-out rows go through the loss batch_size at a time: the same accuracies and SAT
    cross-entropy (weighted by labels) as one forward per row, in fewer forwards."""
    from sdsat.training.loop import evaluate

    config = loop_config(tiny_path, tmp_path, batch_size=4, eval_rows=10, train="sat_adapter", adapter_rank=4, w_std=0.0)
    trainer = Trainer(config, Worker(0, 1, torch.device("cpu")), token_rows(), token_rows(12))
    cfg, calls = trainer.cfg, []
    hook = trainer.module.register_forward_pre_hook(lambda module, args: calls.append(len(args[0]["std_ids"])))
    args = (trainer.module, trainer.val_rows, cfg, 0, 1, torch.device("cpu"), trainer.pad_id)
    batched, single = evaluate(*args), evaluate(*args, one_at_a_time=True)
    hook.remove()
    assert calls == [4, 4, 2] + [1] * 10
    for key in [f"val_sat_acc_{i}" for i in range(1, 5)] + ["val_ce_sat"]:
        assert batched[key] == pytest.approx(single[key], abs=1e-5), key
    assert 0 < batched["val_sat_acc_1"] < 1
