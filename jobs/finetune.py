"""Fine-tune a causal LM with SDSAT semantic adaptive tokens as a Ray Train job.

    python jobs/finetune.py [--config configs/finetune_default.yaml] [--field value ...]
    ray job submit --working-dir . -- python jobs/finetune.py [--config F]
    python jobs/finetune.py --help      # every config field

The config, the model and the data are checked before any worker starts; the run writes
checkpoints to storage_path/name and ends by exporting a Hugging Face checkpoint directory
that load_model(path), jobs/bench.py and the Serve app load.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `jobs.*` for this driver and its Ray workers

from jobs.finetune_config import FinetuneConfig, parse_args  # noqa: E402
from jobs.finetune_data import Plan, prepare  # noqa: E402

log = logging.getLogger("sdsat.finetune")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg, args = parse_args(argv)
        plan = prepare(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("run %s: %d training rows, %s validation rows, export to %s", plan.run_name, len(plan.train_rows),
             "no" if plan.val_rows is None else len(plan.val_rows), plan.export_dir)
    if args.dry_run:
        print(cfg.model_dump_json(indent=2))
        return 0
    from ray.train import TrainingFailedError

    try:
        result = run(cfg, plan)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailedError as exc:
        print(f"error: training failed: {exc}\ncheckpoints so far: {plan.run_dir}", file=sys.stderr)
        return 1
    if result.error:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return 1
    print(f"fine-tuned model exported to {plan.export_dir}")
    print(f"checkpoints: {plan.run_dir}")
    if args.eval is not None:
        from jobs.evaluate import gate_export

        return gate_export(cfg.model, plan.export_dir, args.eval or None)
    return 0


def run(cfg: FinetuneConfig, plan: Plan):
    """Start Ray (or join the cluster of `ray job submit` / RAY_ADDRESS) and fit."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.train_loop import train_func

    if not ray.is_initialized():
        ray.init()
    check_resources(cfg, ray.cluster_resources())
    rows = plan.train_rows
    if cfg.distill_max_new_tokens:
        from jobs.distill import distill_rows

        rows = distill_rows(cfg, rows)
    loop_config = {
        "cfg": cfg.model_dump(),
        "train_rows": ray.put(rows),
        "val_rows": ray.put(plan.val_rows) if plan.val_rows is not None else None,
        "resume_from": plan.resume_from,
        "export_dir": str(plan.export_dir),
        "run_dir": str(plan.run_dir),  # searched for checkpoints on restart (local storage)
    }
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=str(Path(cfg.storage_path).expanduser()) if "://" not in cfg.storage_path else cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    return trainer.fit()


def check_resources(cfg: FinetuneConfig, available: dict) -> None:
    """Refuse a worker group the cluster can never place (it would wait forever)."""
    need = {"CPU": cfg.num_workers * cfg.cpus_per_worker} | ({"GPU": cfg.num_workers} if cfg.use_gpu else {})
    for resource, amount in need.items():
        if available.get(resource, 0) < amount:
            raise ValueError(
                f"{cfg.num_workers} workers need {amount:g} {resource} but the cluster has {available.get(resource, 0):g}: "
                "lower num_workers / cpus_per_worker or use a bigger cluster"
            )


if __name__ == "__main__":
    sys.exit(main())
