"""A fine-tuning run in this process, without Ray: one worker on this machine's GPU (use_gpu)
or CPU, for a lone machine where Ray is not installed or not wanted.

The same plan, self-distillation, training loop, checkpoints and export as the Ray job
(jobs/finetune_ray.py), with one worker. Checkpoints go to run_dir/checkpoint_<step>, the
layout the Ray job leaves there, so re-running the same name resumes either kind of run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from .checkpoint import checkpoint_dirs
from .distill import distill_part, distill_rows
from .loop import Trainer, Worker
from .plan import Plan
from .storage import is_uri

log = logging.getLogger("sdsat.finetune")


def check_local(cfg: dict, plan: Plan) -> torch.device:
    """The device of an in-process run; ValueError for what it cannot do."""
    if cfg["num_workers"] != 1:
        raise ValueError(f"num_workers={cfg['num_workers']}: a run without Ray has one worker (set num_workers 1, or use Ray)")
    if cfg["strategy"] == "fsdp":
        raise ValueError("strategy=fsdp shards over several Ray workers: a run without Ray uses strategy ddp")
    if is_uri(plan.run_dir) or is_uri(plan.export_dir):
        raise ValueError(f"storage_path and export_dir must be local paths for a run without Ray, got {plan.run_dir!r}, {plan.export_dir!r}")
    if cfg["use_gpu"] and not torch.cuda.is_available():
        raise ValueError("use_gpu=true but this machine has no CUDA device torch can use")
    return torch.device("cuda") if cfg["use_gpu"] else torch.device("cpu")


def fit_local(cfg: dict, plan: Plan) -> str:
    """Distil, train and export in this process; the export's path."""
    device = check_local(cfg, plan)
    rows = plan.train_rows
    if cfg["distill_max_new_tokens"]:
        rows = distill_rows(cfg, rows, lambda parts: [distill_part(cfg, part) for part in parts])
    run_dir = Path(plan.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"cfg": cfg, "resume_from": plan.resume_from, "export_dir": plan.export_dir, "run_dir": str(run_dir)}
    trainer = Trainer(config, Worker(0, 1, device), rows, plan.val_rows)
    trainer.restore(None)  # this run's latest checkpoint on disk, else resume_from

    def report(metrics: dict, write_checkpoint) -> None:
        if write_checkpoint is not None:
            save(run_dir, metrics["step"], write_checkpoint, cfg["keep_checkpoints"])

    trainer.fit(report)
    return trainer.export()


def save(run_dir: Path, step: int, write_checkpoint, keep: int) -> Path:
    """Write a checkpoint beside the run's others (complete before it gets its name), then
    drop all but the ``keep`` newest."""
    target = run_dir / f"checkpoint_{step:06d}"
    staging = run_dir / f".writing_{step:06d}"  # not a checkpoint_* name: never taken for one
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write_checkpoint(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    for old in checkpoint_dirs(run_dir)[:-keep]:  # named by zero-padded step: sorted oldest first
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint: %s", target)
    return target
