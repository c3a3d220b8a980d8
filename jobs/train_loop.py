"""The per-worker training function of jobs/finetune.py, run by Ray Train on every rank.

1. model with SATs, what trains, DDP/FSDP wrapper, optimizer, schedule;
2. data: packed token rows (from the object store) turned into SAT-augmented rows;
3. restore the latest checkpoint (after a failure, or of an earlier run);
4. loop: micro-batches with gradient accumulation, metrics and a progress line every
   step, validation and checkpoints at intervals;
5. export a plain Hugging Face checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from jobs.train_checkpoint import export, latest_complete, load_checkpoint, read_state, save_checkpoint
from jobs.train_setup import LossModule, build_model, loss_config, make_optimizer, make_scheduler, select_trainable, wrap
from sdsat.training.frozen_loss import collate_two_pass
from sdsat.training.rows import RowConfig, build_row, collate

log = logging.getLogger("sdsat.finetune")


class RowStream:
    """Sample i of the run -> an augmented row; a pure function of (seed, i), so a resumed
    run sees exactly the rows it would have seen. Each epoch is a fresh permutation."""

    def __init__(self, rows, sat_ids: list[int], row_cfg: RowConfig, seed: int, salt: int = 0):
        self.rows, self.sat_ids, self.row_cfg = rows, sat_ids, row_cfg
        self.seed, self.salt = seed, salt
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> dict:
        epoch, j = divmod(i, len(self.rows))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        tokens = [int(t) for t in self.rows[self._perm[1][j]]]
        rng = random.Random(self.seed * 10**12 + self.salt * 10**10 + i)
        return build_row(tokens, self.sat_ids, self.row_cfg, rng)


class MetricSums:
    """Sums of per-batch metrics, reduced over micro-batches and ranks in one all-reduce."""

    def __init__(self, k: int):
        self.k = k
        self.v = torch.zeros(6 + 2 * k, dtype=torch.float64)  # batches, loss, ce_std*n, n_std, ce_sat*n, n_sat, hits[k], count[k]
        self.tokens = 0

    def add(self, m: dict, tokens: int, weight: float = 1.0) -> None:
        count = torch.tensor(m["sat_count"], dtype=torch.float64)
        acc = torch.tensor([0.0 if math.isnan(a) else a for a in m["sat_acc"]], dtype=torch.float64)
        head = [1.0, m["loss"], m["ce_std"] * m["n_std"], m["n_std"], m["ce_sat"] * m["n_sat"], m["n_sat"]]
        self.v += weight * torch.cat([torch.tensor(head, dtype=torch.float64), acc * count, count])
        self.tokens += int(weight * tokens)

    def reduce(self, prefix: str = "") -> dict:
        v = torch.cat([self.v, torch.tensor([float(self.tokens)], dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(v)
        k = self.k
        hits, count = v[6 : 6 + k], v[6 + k : 6 + 2 * k]
        out = {
            f"{prefix}loss": float(v[1] / max(v[0], 1)),
            f"{prefix}ce_std": float(v[2] / max(v[3], 1)),
            f"{prefix}ce_sat": float(v[4] / max(v[5], 1)),
        }
        for i in range(k):
            out[f"{prefix}sat_acc_{i + 1}"] = float(hits[i] / count[i]) if count[i] else float("nan")
        out[f"{prefix}tokens"] = int(v[-1])
        return out


def train_func(config: dict) -> None:
    cfg = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _setup_logging(rank)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"] + rank)

    # 1. Model, SATs, what trains, wrapper, optimizer, schedule.
    loaded = build_model(cfg)
    k = cfg["num_sat"]
    sat_ids = loaded.sat.ids_for(k)
    options = select_trainable(loaded.model, sat_ids, cfg)
    module = wrap(LossModule(loaded.model, loss_config(cfg, loaded.sat.unique_ids)), cfg, device, world)
    module.train()
    optimizer = make_optimizer(module, options, device)
    scheduler = make_scheduler(optimizer, cfg)

    # 2. Data.
    row_cfg = RowConfig(k, cfg["poisson_lambda"], cfg["max_blocks"], cfg["variable_length"], cfg["seed"])
    train_rows = RowStream(ray.get(config["train_rows"]), sat_ids, row_cfg, cfg["seed"])
    val_rows = RowStream(ray.get(config["val_rows"]), sat_ids, row_cfg, cfg["seed"], salt=1) if config["val_rows"] else None
    pad_id = loaded.tokenizer.pad_token_id or 0

    # 3. Restore.
    state = {"step": 0, "samples": 0, "train_s": 0.0}
    restored = _restore(config, module, optimizer, scheduler, rank)
    if restored:
        state = {key: restored[key] for key in state}
        log.info("resumed at step %d (%d samples seen)", state["step"], state["samples"])

    # 4. Loop.
    step_args = (module, optimizer, scheduler, train_rows, cfg, rank, world, device, pad_id)
    while state["step"] < cfg["max_steps"]:
        metrics = train_step(*step_args, state)
        step = state["step"]
        if cfg["fail_at_step"] == step and not restored and rank == world - 1:
            log.error("fail_at_step=%d: this worker exits now (testing recovery)", step)
            os._exit(1)
        stop = _time_is_up(state, cfg)
        if val_rows is not None and cfg["eval_every"] and (step % cfg["eval_every"] == 0 or step == cfg["max_steps"] or stop):
            metrics.update(evaluate(module, val_rows, cfg, rank, world, device, pad_id))
        if rank == 0:
            log.info(progress_line(metrics, cfg["max_steps"]))
        checkpoint_now = step % cfg["checkpoint_every"] == 0 or step == cfg["max_steps"] or stop
        _report(metrics, state, module, optimizer, scheduler, cfg, rank, checkpoint_now)
        if stop:
            log.info("max_minutes=%s reached after step %d: stopping", cfg["max_minutes"], step)
            break

    # 5. Export.
    module.eval()
    path = export(module, loaded, cfg, Path(config["export_dir"]), rank, sharded=cfg["strategy"] == "fsdp" and world > 1)
    if path is not None:
        log.info("export: %s", path)


def train_step(module, optimizer, scheduler, rows: RowStream, cfg, rank, world, device, pad_id, state) -> dict:
    """One optimizer step over grad_accum micro-batches of batch_size rows per rank."""
    start = time.perf_counter()
    batch_size, accum = cfg["batch_size"], cfg["grad_accum"]
    sums = MetricSums(cfg["num_sat"])
    optimizer.zero_grad(set_to_none=True)
    for micro in range(accum):
        first = state["samples"] + (micro * world + rank) * batch_size
        augmented = [rows.row(first + j) for j in range(batch_size)]
        batch = {key: t.to(device) for key, t in _collate(cfg)(augmented, pad_id, torch.float32).items()}
        with _no_sync(module, last=micro == accum - 1), _autocast(cfg, device):
            loss, m = module(batch)
            (loss / accum).backward()
        sums.add(m, tokens=sum(len(r["input_ids"]) for r in augmented))
    params = [p for p in module.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    state["step"] += 1
    state["samples"] += batch_size * accum * world
    metrics = sums.reduce()
    seconds = time.perf_counter() - start
    state["train_s"] += seconds
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    metrics.update(step=state["step"], lr=lr, grad_norm=float(grad_norm), step_s=seconds,
                   tokens_per_s=metrics["tokens"] / seconds, epoch=state["samples"] / len(rows))
    return metrics


@torch.no_grad()
def evaluate(module, rows: RowStream, cfg, rank, world, device, pad_id) -> dict:
    """Validation metrics (val_*) on the first eval_rows held-out rows, spread over ranks.

    Every rank runs the same number of forwards (DDP/FSDP forwards are collective); a rank
    short of rows repeats one with weight 0.
    """
    n = min(cfg["eval_rows"], len(rows))
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world)
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    sums = MetricSums(cfg["num_sat"])
    was_training = module.training
    module.eval()
    for start in range(0, per_rank, cfg["batch_size"]):
        for i, w in zip(mine[start : start + cfg["batch_size"]], weights[start : start + cfg["batch_size"]]):
            row = rows.row(i)
            batch = {key: t.to(device) for key, t in _collate(cfg)([row], pad_id, torch.float32).items()}
            with _autocast(cfg, device):
                _, m = module(batch)
            sums.add(m, tokens=len(row["input_ids"]), weight=w)
    module.train(was_training)
    out = sums.reduce(prefix="val_")
    out.pop("val_tokens")
    return out


def progress_line(m: dict, max_steps: int) -> str:
    accs = " ".join(f"{m[key]:.2f}" for key in sorted(k for k in m if k.startswith("sat_acc_")))
    line = (f"step {m['step']}/{max_steps} | loss {m['loss']:.3f} | ce_std {m['ce_std']:.3f} | ce_sat {m['ce_sat']:.3f}"
            f" | sat_acc {accs} | {m['tokens_per_s']:.0f} tok/s | lr {m['lr']:.2e} | {m['step_s']:.1f} s")
    if "val_loss" in m:
        val_accs = " ".join(f"{m[key]:.2f}" for key in sorted(k for k in m if k.startswith("val_sat_acc_")))
        line += f" | val_loss {m['val_loss']:.3f} val_sat_acc {val_accs}"
    return line


def _report(metrics, state, module, optimizer, scheduler, cfg, rank, checkpoint_now: bool) -> None:
    if not checkpoint_now:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), module, optimizer, scheduler, dict(state, metrics=metrics, config=cfg), rank)
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{state['step']:06d}")


def _restore(config: dict, module, optimizer, scheduler, rank) -> dict | None:
    """This run's latest checkpoint (after a failure or on a re-run of the same name),
    else ``resume_from`` (an earlier run), else None.

    Ray hands over the latest checkpoint its controller registered; one persisted just
    before a worker died may not be registered yet, so on local storage the run directory
    is searched too and the newer complete checkpoint wins.
    """
    run_dir = Path(config["run_dir"])
    on_disk = latest_complete(run_dir) if run_dir.is_dir() else None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if on_disk is None or read_state(Path(directory))["step"] >= read_state(on_disk)["step"]:
                return load_checkpoint(Path(directory), module, optimizer, scheduler, rank)
    if on_disk is not None:
        return load_checkpoint(on_disk, module, optimizer, scheduler, rank)
    if config.get("resume_from"):
        return load_checkpoint(Path(config["resume_from"]), module, optimizer, scheduler, rank)
    return None


def _time_is_up(state: dict, cfg: dict) -> bool:
    """Same answer on every rank (rank 0's clock decides)."""
    if not cfg["max_minutes"]:
        return False
    flag = torch.tensor([float(state["train_s"] >= 60 * cfg["max_minutes"])])
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def _collate(cfg: dict):
    """Rows -> batch: one pass over standard and SAT tokens, or two (frozen base, sat_adapter)."""
    return collate_two_pass if cfg["train"] == "sat_adapter" else collate


def _no_sync(module, last: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
    if not last and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def _autocast(cfg: dict, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")


def _setup_logging(rank: int) -> None:
    logger = logging.getLogger("sdsat")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no per-report INFO lines
    jobs_logger = logging.getLogger("jobs")
    jobs_logger.handlers, jobs_logger.propagate = logger.handlers, False
    jobs_logger.setLevel(logging.INFO)
