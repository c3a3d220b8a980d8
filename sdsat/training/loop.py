"""The training loop of one rank (no Ray here: jobs/finetune_ray.py runs it under Ray Train).

1. model with SATs, what trains, DDP/FSDP wrapper, optimizer, schedule;
2. data: packed token rows turned into SAT-augmented rows;
3. restore the latest checkpoint (after a failure, or of an earlier run);
4. loop: micro-batches with gradient accumulation, metrics and a progress line every
   step, validation and checkpoints at intervals (handed to the runner's ``report``);
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import latest_complete, load_checkpoint, read_state, save_checkpoint
from .curve import CURVE_FILE, write_curve
from .export import export
from .frozen_loss import collate_two_pass
from .fsdp import build_sharded
from .metrics import MetricSums, progress_line
from .precision import resolve_precision
from .rows import RowConfig, build_row, collate
from .setup import LossModule, build_model, loss_config, make_optimizer, make_scheduler, schedule_of, select_trainable, wrap
from .storage import is_uri, upload

log = logging.getLogger("sdsat.finetune")

PLAN_AFTER = 3  # steps timed before a time-boxed run plans its step count (the first is slower: warm-up)
LOG_EVERY_S = 10.0  # a progress line at least this often (and at the first, last and evaluated steps)


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


@dataclass
class Worker:
    """Where this copy of the loop runs: its rank among world ranks, and its device."""

    rank: int
    world: int
    device: torch.device


# report(metrics, write_checkpoint): hand the step's metrics to the runner; write_checkpoint
# (None on steps without one) writes this rank's part of a checkpoint into a directory.
Report = Callable[[dict, Optional[Callable[[Path], None]]], None]


class Trainer:
    """One rank of a fine-tuning run (config: the dict jobs/finetune_ray.py hands each worker)."""

    def __init__(self, config: dict, worker: Worker, train_rows, val_rows):
        # precision "auto" becomes what this worker's device runs natively (and the recipe records it).
        cfg = self.cfg = dict(config["cfg"], precision=resolve_precision(config["cfg"]["precision"], worker.device, "training"))
        self.config, self.worker = config, worker
        torch.manual_seed(cfg["seed"] + worker.rank)

        # 1. Model, SATs, what trains, wrapper, optimizer, schedule.
        k = cfg["num_sat"]
        self.sharded = cfg["strategy"] == "fsdp" and worker.world > 1
        if self.sharded:
            self.loaded, self.module, options = build_sharded(cfg, worker.rank, worker.device)
        else:
            self.loaded = build_model(cfg)
            options = select_trainable(self.loaded.model, self.loaded.sat.ids_for(k), cfg)
            self.module = wrap(LossModule(self.loaded.model, loss_config(cfg, self.loaded.sat.unique_ids)), cfg, worker.device, worker.world)
        sat_ids = self.loaded.sat.ids_for(k)
        self.module.train()
        self.optimizer = make_optimizer(self.module, options, worker.device)
        self.scheduler = make_scheduler(self.optimizer, cfg)

        # 2. Data.
        row_cfg = RowConfig(k, cfg["poisson_lambda"], cfg["max_blocks"], cfg["variable_length"], cfg["seed"])
        self.train_rows = RowStream(train_rows, sat_ids, row_cfg, cfg["seed"])
        self.val_rows = RowStream(val_rows, sat_ids, row_cfg, cfg["seed"], salt=1) if val_rows is not None else None
        self.pad_id = self.loaded.tokenizer.pad_token_id or 0
        self.state = {"step": 0, "samples": 0, "train_s": 0.0, "planned": False}
        self.history: list[dict] = []  # per-step metrics (rank 0): the training curve
        self.restored = False

    def restore(self, given: Path | None) -> None:
        """3. Continue from this run's latest checkpoint (``given``: the one the runner
        registered, after a failure or on a re-run of the same name), else ``resume_from``.

        A checkpoint persisted just before a worker died may not be registered yet, so on
        local storage the run directory is searched too and the newer complete one wins.
        """
        run_dir = self.config["run_dir"]
        on_disk = latest_complete(Path(run_dir)) if not is_uri(run_dir) and Path(run_dir).is_dir() else None
        if given is not None and (on_disk is None or read_state(given)["step"] >= read_state(on_disk)["step"]):
            chosen = given
        elif on_disk is not None:
            chosen = on_disk
        elif self.config.get("resume_from"):
            chosen = Path(self.config["resume_from"])
        else:
            return
        restored = load_checkpoint(chosen, self.module, self.optimizer, self.scheduler, self.worker.rank)
        self.state = {key: restored.get(key, default) for key, default in self.state.items()}
        self.history = restored.get("history", [])
        if chosen == Path(self.config.get("resume_from") or ""):  # an earlier run: this run's schedule and budget
            schedule, cfg = schedule_of(self.scheduler), self.cfg
            schedule.warmup, schedule.total, schedule.floor = cfg["warmup_steps"], cfg["max_steps"], cfg["min_lr_ratio"]
            self.state.update(planned=False, train_s=0.0)
        self.restored = True
        log.info("resumed at step %d (%d samples seen)", self.state["step"], self.state["samples"])

    def fit(self, report: Report) -> None:
        """4. Steps until max_steps (or as many as fit max_minutes), with validation and checkpoints."""
        cfg, rank, world = self.cfg, self.worker.rank, self.worker.world
        schedule, step_times, logged = schedule_of(self.scheduler), [], 0.0
        while self.state["step"] < schedule.total:
            metrics = train_step(self.module, self.optimizer, self.scheduler, self.train_rows, cfg, rank, world,
                                 self.worker.device, self.pad_id, self.state)
            step = self.state["step"]
            if rank == 0:
                self.history.append(metrics)  # evaluation adds its val_* entries to this dict below
            step_times.append(metrics["step_s"])
            if cfg["fail_at_step"] == step and not self.restored and rank == world - 1:
                log.error("fail_at_step=%d: this worker exits now (testing recovery)", step)
                os._exit(1)
            if cfg["max_minutes"] and not self.state["planned"] and len(step_times) == PLAN_AFTER:
                self._plan_steps(step_times[1:])
            stop = _time_is_up(self.state, cfg, self.worker.device)
            last = step == schedule.total or stop
            evaluated = self.val_rows is not None and cfg["eval_every"] and (step % cfg["eval_every"] == 0 or last)
            if evaluated:
                metrics.update(evaluate(self.module, self.val_rows, cfg, rank, world, self.worker.device, self.pad_id))
            if rank == 0 and (len(step_times) == 1 or last or evaluated or self.state["train_s"] - logged >= LOG_EVERY_S):
                logged = self.state["train_s"]
                recent = step_times[-10:]
                log.info(progress_line(metrics, schedule.total, (schedule.total - step) * sum(recent) / len(recent)))
            write = None
            if step % cfg["checkpoint_every"] == 0 or last:
                state = dict(self.state, metrics=metrics, config=cfg, history=self.history)
                write = lambda directory: save_checkpoint(directory, self.module, self.optimizer, self.scheduler, state, rank, world)  # noqa: E731
            report(metrics, write)
            if stop:
                log.info("max_minutes=%s reached after step %d: stopping", cfg["max_minutes"], step)
                break
        if rank == 0 and self.history:
            self._write_curve()

    def _write_curve(self) -> None:
        """The training curve (PNG) and its metrics (JSON lines) in the run directory."""
        run_dir = self.config["run_dir"]
        if not is_uri(run_dir):
            log.info("training curve: %s", write_curve(self.history, Path(run_dir)))
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_curve(self.history, Path(tmp))
            upload(Path(tmp), run_dir)
        log.info("training curve: %s/%s", run_dir, CURVE_FILE)

    def _plan_steps(self, step_times: list[float]) -> None:
        """Size the run to its time budget from the measured step time (rank 0's measurement,
        so every rank plans the same): the schedule then decays over the steps that fit."""
        schedule, cfg = schedule_of(self.scheduler), self.cfg
        per_step = sum(step_times) / len(step_times)
        left = 60 * cfg["max_minutes"] - self.state["train_s"]
        planned = torch.tensor([min(cfg["max_steps"], self.state["step"] + int(left / per_step))], device=self.worker.device)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(planned, src=0)
        schedule.total = max(int(planned.item()), self.state["step"] + 1)
        self.state["planned"] = True
        log.info("time budget %.1f min at %.2f s/step: %d steps (max_steps %d)", cfg["max_minutes"], per_step,
                 schedule.total, cfg["max_steps"])

    def export(self) -> str | None:
        """5. A plain Hugging Face checkpoint (or artifact) in export_dir; its path on rank 0."""
        self.module.eval()
        path = export(self.module, self.loaded, self.cfg, self.config["export_dir"], self.worker.rank)
        if path is not None:
            log.info("export: %s", path)
        return path


def train_step(module, optimizer, scheduler, rows: RowStream, cfg, rank, world, device, pad_id, state) -> dict:
    """One optimizer step over grad_accum micro-batches of batch_size rows per rank."""
    start = time.perf_counter()
    batch_size, accum = cfg["batch_size"], cfg["grad_accum"]
    sums = MetricSums(cfg["num_sat"], device)
    optimizer.zero_grad(set_to_none=True)
    for micro in range(accum):
        first = state["samples"] + (micro * world + rank) * batch_size
        augmented = [rows.row(first + j) for j in range(batch_size)]
        batch = {key: t.to(device) for key, t in _collate(cfg)(augmented, pad_id).items()}
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
def evaluate(module, rows: RowStream, cfg, rank, world, device, pad_id, one_at_a_time: bool = False) -> dict:
    """Validation metrics (val_*) on the first eval_rows held-out rows, spread over ranks.

    Every rank runs the same number of forwards (DDP/FSDP forwards are collective). When the
    rows divide evenly over the ranks (always with one), each rank runs them batch_size at a
    time (a GPU's eval was 64 forwards of one row); otherwise, or with ``one_at_a_time``, one
    at a time, a rank short of rows repeating one with weight 0.
    """
    n = min(cfg["eval_rows"], len(rows))
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world)
    size = 1 if one_at_a_time or n % world else cfg["batch_size"]
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    sums = MetricSums(cfg["num_sat"], device)
    was_training = module.training
    module.eval()
    for start in range(0, per_rank, size):
        chunk = [rows.row(i) for i in mine[start : start + size]]
        batch = {key: t.to(device) for key, t in _collate(cfg)(chunk, pad_id).items()}
        with _autocast(cfg, device):
            _, m = module(batch)
        sums.add(m, tokens=sum(len(row["input_ids"]) for row in chunk), weight=weights[start])
    module.train(was_training)
    out = sums.reduce(prefix="val_")
    out.pop("val_tokens")
    return out


def _time_is_up(state: dict, cfg: dict, device: torch.device) -> bool:
    """Same answer on every rank (rank 0's clock decides)."""
    if not cfg["max_minutes"]:
        return False
    flag = torch.tensor([float(state["train_s"] >= 60 * cfg["max_minutes"])], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def _collate(cfg: dict):
    """(rows, pad_id) -> batch: one pass over standard and SAT tokens, or two (frozen base,
    sat_adapter; its masks are built on the device, by the loss)."""
    if cfg["train"] == "sat_adapter":
        return collate_two_pass
    return lambda rows, pad_id: collate(rows, pad_id, torch.float32)


def _no_sync(module, last: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
    if not last and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def _autocast(cfg: dict, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")
