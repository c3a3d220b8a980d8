"""The Ray glue of jobs/finetune.py: self-distillation as Ray tasks, the TorchTrainer, and
the per-worker function that runs sdsat.training's loop under Ray Train (rank, device,
the registered checkpoint, ray.train.report). Everything else lives in sdsat/training/."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch

from sdsat.training.config import FinetuneConfig
from sdsat.training.distill import distill_part, distill_rows
from sdsat.training.loop import Trainer, Worker
from sdsat.training.plan import Plan
from sdsat.training.storage import is_uri

log = logging.getLogger("sdsat.finetune")


def fit(cfg: FinetuneConfig, plan: Plan):
    """Start Ray (or join the cluster of `ray job submit` / RAY_ADDRESS) and fit."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    joined = bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()  # `ray job submit` sets RAY_ADDRESS
    if not ray.is_initialized():
        ray.init()
    check_resources(cfg, ray.cluster_resources(), _possible_resources(), joined)
    values = cfg.model_dump()
    rows = plan.train_rows
    if cfg.distill_max_new_tokens:
        rows = distill_rows(values, rows, lambda parts: _distill_with_tasks(cfg, parts))
    loop_config = {
        "cfg": values,
        "train_rows": ray.put(rows),
        "val_rows": ray.put(plan.val_rows) if plan.val_rows is not None else None,
        "resume_from": plan.resume_from,
        "export_dir": plan.export_dir,  # a path or a URI
        "run_dir": plan.run_dir,  # searched for checkpoints on restart (local storage)
    }
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=cfg.storage_path if is_uri(cfg.storage_path) else str(Path(cfg.storage_path).expanduser()),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    return trainer.fit()


def check_resources(cfg: FinetuneConfig, available: dict, possible: dict | None, joined: bool) -> None:
    """Refuse a worker group the cluster can never place (it would wait forever); warn and go
    on where an autoscaler can still start the nodes it needs (GPU workers scaled to zero).

    available: the cluster's resources now; possible: the most its autoscaler can provide
    (None: unknown); joined: the job joined an existing cluster, which an autoscaler may grow.
    """
    need = {"CPU": cfg.num_workers * cfg.cpus_per_worker} | ({"GPU": cfg.num_workers} if cfg.use_gpu else {})
    for resource, amount in need.items():
        have = available.get(resource, 0)
        if have >= amount:
            continue
        wanted = f"{cfg.num_workers} workers need {amount:g} {resource} but the cluster has {have:g} now"
        if possible is not None and possible.get(resource, 0) < amount:
            raise ValueError(f"{wanted} and its autoscaler can reach {possible.get(resource, 0):g}: "
                             "lower num_workers / cpus_per_worker or allow more worker nodes")
        if possible is None and not joined:
            raise ValueError(f"{wanted}: lower num_workers / cpus_per_worker or use a bigger cluster")
        log.warning("%s; %s", wanted, "its autoscaler can start the nodes: waiting for them" if possible is not None
                    else "waiting for an autoscaler to add nodes (check `ray status` if none comes)")


def _possible_resources() -> dict | None:
    """The most resources the cluster's autoscaler can start (its cluster config), None if unknown."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: unknown is a safe answer
        return None


def _distill_with_tasks(cfg: FinetuneConfig, parts: list) -> list:
    """One Ray task per part, each with a worker's CPUs (and its GPU, where workers get one)."""
    task = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0)(_distill_task)
    return ray.get([task.remote(cfg.model_dump(), part, i) for i, part in enumerate(parts)])


def _distill_task(values: dict, items: list, part: int) -> list:
    _setup_logging(f"distill {part}")  # its progress lines reach the driver's output
    return distill_part(values, items)


def train_func(config: dict) -> None:
    """Run on every Ray Train worker."""
    ctx = ray.train.get_context()
    worker = Worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    _setup_logging(f"rank {worker.rank}")
    val_rows = ray.get(config["val_rows"]) if config["val_rows"] is not None else None
    trainer = Trainer(config, worker, ray.get(config["train_rows"]), val_rows)
    registered = ray.train.get_checkpoint()
    with registered.as_directory() if registered is not None else contextlib.nullcontext() as directory:
        trainer.restore(Path(directory) if directory else None)
    trainer.fit(_report)
    trainer.export()


def _report(metrics: dict, write_checkpoint) -> None:
    if write_checkpoint is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp))
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{metrics['step']:06d}")


def _setup_logging(prefix: str) -> None:
    logger = logging.getLogger("sdsat")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[{prefix}] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no per-report INFO lines
