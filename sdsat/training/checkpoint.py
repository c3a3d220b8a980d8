"""Checkpoints of a fine-tuning run and the final export.

A checkpoint directory (``checkpoint_<step>``) holds:
- ``dcp/``: model and optimizer state, saved with torch.distributed.checkpoint (each rank
  writes its own shard: works for DDP and FSDP, and reloads on a different world size);
- ``trainer_state.json`` (rank 0): step, samples consumed, scheduler state, metrics, config;
- ``rng_rank<r>.pt``: each rank's torch RNG state.
Every rank writes into its own local directory and reports it; Ray Train merges them into
one checkpoint directory in storage.
"""

from __future__ import annotations

import json
import pickle
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..model.adapter import get_adapter
from ..model.load import LoadedModel, parse_dtype, save_artifact, save_model

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
# DCP names its index ".metadata"; Ray's checkpoint upload skips hidden files, so it is
# stored under this name and put back before loading.
DCP_INDEX, DCP_INDEX_STORED = ".metadata", "dcp_index.pkl"


def save_checkpoint(directory: Path, module, optimizer, scheduler, state: dict, rank: int) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (collective: all ranks call it)."""
    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / "dcp"))
    if (directory / "dcp" / DCP_INDEX).exists():
        (directory / "dcp" / DCP_INDEX).rename(directory / "dcp" / DCP_INDEX_STORED)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        full = dict(state, scheduler=scheduler.state_dict())
        (directory / STATE_FILE).write_text(json.dumps(full, indent=2) + "\n")


def load_checkpoint(directory: Path, module, optimizer, scheduler, rank: int) -> dict:
    """Restore model, optimizer, scheduler and RNG from a checkpoint directory; return its state."""
    state = read_state(directory)
    index = directory / "dcp" / DCP_INDEX
    if not index.exists():  # every rank may do this at once: copy, then rename atomically
        partial = index.with_name(f"{DCP_INDEX}.rank{rank}")
        shutil.copyfile(directory / "dcp" / DCP_INDEX_STORED, partial)
        partial.replace(index)
    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / "dcp"))
    set_state_dict(module, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    scheduler.load_state_dict(state["scheduler"])
    rng = directory / f"rng_rank{rank}.pt"
    if rng.exists():  # a run resumed on more workers than it was saved with: keep the seeded RNG
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def read_state(directory: Path) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a fine-tuning checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text())


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest (highest step) complete checkpoint of a run directory."""
    path = Path(path).expanduser()
    if (path / STATE_FILE).exists():
        if not is_complete(path):
            raise ValueError(f"resume_from={str(path)!r}: the checkpoint is incomplete (a rank's shard is missing)")
        return path
    if not path.is_dir():
        raise ValueError(f"resume_from={str(path)!r}: no such run or checkpoint directory")
    latest = latest_complete(path)
    if latest is None:
        raise ValueError(f"resume_from={str(path)!r}: no complete checkpoint_* directory in it")
    return latest


def latest_complete(run_dir: Path) -> Path | None:
    """The highest-step checkpoint of a run directory whose every shard was written."""
    found = [(read_state(d)["step"], d) for d in checkpoint_dirs(run_dir) if is_complete(d)]
    return max(found)[1] if found else None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(d for d in Path(run_dir).glob("checkpoint_*") if d.is_dir())


def is_complete(directory: Path) -> bool:
    """All files the checkpoint's DCP index refers to exist, and its trainer state too."""
    dcp_dir = directory / "dcp"
    index = dcp_dir / DCP_INDEX_STORED
    if not index.exists():
        index = dcp_dir / DCP_INDEX
    if not (directory / STATE_FILE).exists() or not index.exists():
        return False
    with open(index, "rb") as f:
        metadata = pickle.load(f)
    for info in metadata.storage_data.values():
        shard = dcp_dir / info.relative_path
        if not shard.exists() or shard.stat().st_size < info.offset + info.length:
            return False
    return True


def export(module, loaded: LoadedModel, cfg: dict, directory: Path, rank: int, sharded: bool) -> Path | None:
    """Write a plain Hugging Face checkpoint (model, tokenizer, sdsat_config.json) on rank 0.

    Collective for FSDP (the full state dict is gathered). An earlier export in the same
    place is replaced only once the new one is complete.
    """
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) if sharded else None
    if rank != 0:
        return None
    model = loaded.model
    if sharded:  # the training model holds shards: fill a fresh replica with the gathered weights
        from .setup import build_model

        fresh = build_model(cfg)
        fresh.model.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
        model = fresh.model
    elif cfg["train"] == "sat_adapter":
        model = _fresh_base_with(loaded, cfg)
    model = model.to("cpu", parse_dtype(cfg["export_dtype"]))
    sat = replace(loaded.sat, num_sat_trained=cfg["num_sat"], recipe=dict(cfg))
    directory = Path(directory).expanduser()
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if cfg["export_format"] == "artifact":
        save_artifact(replace(loaded, model=model, sat=sat), staging, dtype=parse_dtype(cfg["export_dtype"]))
    else:
        save_model(replace(loaded, model=model, sat=sat), staging)
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)
    log.info("exported the fine-tuned model to %s", directory)
    return directory


def _fresh_base_with(loaded: LoadedModel, cfg: dict):
    """The base model as loaded (fp32, never cast for training) with the trained adapter's weights."""
    from .setup import build_model

    trained = get_adapter(loaded.model)
    fresh = build_model(cfg).model
    adapter = get_adapter(fresh)
    if adapter is None:
        from ..model.adapter import attach_adapter

        adapter = attach_adapter(fresh, loaded.sat.sat_ids, trained.cfg)
    adapter.load_state_dict({k: v.float() for k, v in trained.state_dict().items()})
    fresh.eval()
    return fresh


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
