"""Fine-tune a causal LM with SDSAT semantic adaptive tokens as a Ray Train job.

    python jobs/finetune.py [--config configs/finetune_default.yaml] [--field value ...]
    ray job submit --working-dir . -- python jobs/finetune.py [--config F]
    python jobs/finetune.py --config F --no-ray [--use-gpu true]   # in this process, one worker
    python jobs/finetune.py --help      # every config field

The config, the model and the data are checked before any worker starts; the run writes
checkpoints to storage_path/name and ends by exporting a Hugging Face checkpoint directory
that load_model(path), jobs/bench.py and the Serve app load.
"""

from __future__ import annotations

import logging
import sys

from sdsat.training.config import parse_args
from sdsat.training.plan import prepare

log = logging.getLogger("sdsat.finetune")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg, args = parse_args(argv)
        cfg.name = cfg.run_name()
        plan = prepare(cfg.model_dump())
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("run %s: %d training rows, %s validation rows, export to %s", plan.run_name, len(plan.train_rows),
             "no" if plan.val_rows is None else len(plan.val_rows), plan.export_dir)
    if args.dry_run:
        print(cfg.model_dump_json(indent=2))
        return 0
    if args.no_ray:
        from sdsat.training.local import fit_local

        try:
            path = fit_local(cfg.model_dump(), plan)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"fine-tuned model exported to {path}")
        print(f"checkpoints: {plan.run_dir}")
        return _gate(cfg, args, plan)
    from ray.train import TrainingFailedError

    from jobs.finetune_ray import fit

    try:
        result = fit(cfg, plan)
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
    return _gate(cfg, args, plan)


def _gate(cfg, args, plan) -> int:
    if args.eval is None:
        return 0
    from jobs.evaluate import gate_export

    return gate_export(cfg.model, plan.export_dir, args.eval or None)


if __name__ == "__main__":
    sys.exit(main())
