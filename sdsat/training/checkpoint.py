"""Checkpoints of a fine-tuning run, in safe formats only (safetensors and JSON).

A checkpoint directory (``checkpoint_<step>``) holds:
- ``weights/``: model and optimizer tensors, saved with torch.distributed.checkpoint in
  safetensors (each rank writes its own shard: works for DDP and FSDP, and reloads on a
  different world size);
- ``trainer_state.json`` (rank 0): step, samples consumed, scheduler state, the optimizer's
  parameter groups (its only non-tensor state), metrics, config;
- ``rank<r>.json``: the weight files rank r wrote and their sizes (a checkpoint is complete
  when every rank's files are there);
- ``rng_rank<r>.safetensors``: each rank's torch RNG state.
Every rank writes into its own local directory and reports it; Ray Train merges them into
one checkpoint directory in storage.

Loading never unpickles: a directory with pickle-based files (``.pt``, ``.pkl``, DCP's
``.metadata``, the layout of earlier versions) is refused with an error saying so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
WEIGHTS_DIR = "weights"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".metadata", ".distcp")


def save_checkpoint(directory: Path, module, optimizer, scheduler, state: dict, rank: int, world: int) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (collective: all ranks call it)."""
    model_sd, optim_sd = get_state_dict(module, optimizer)
    tensors = _tensors(model_sd, optim_sd)
    weights = Path(directory) / WEIGHTS_DIR
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(weights), save_distributed=True))
    files = {p.name: p.stat().st_size for p in sorted(weights.glob("*.safetensors"))} if weights.is_dir() else {}
    (Path(directory) / f"rank{rank}.json").write_text(json.dumps({"files": files}) + "\n")
    save_file(_rng_state(), str(Path(directory) / f"rng_rank{rank}.safetensors"))
    if rank == 0:
        full = dict(state, world=world, scheduler=scheduler.state_dict(), param_groups=optim_sd["param_groups"])
        (Path(directory) / STATE_FILE).write_text(json.dumps(full, indent=2) + "\n")


def load_checkpoint(directory: Path, module, optimizer, scheduler, rank: int) -> dict:
    """Restore model, optimizer, scheduler and RNG from a checkpoint directory; return its state."""
    directory = Path(directory)
    refuse_unsafe(directory)
    state = read_state(directory)
    model_sd, optim_sd = get_state_dict(module, optimizer)  # the layout to fill (optimizer state initialised)
    dcp.load(_tensors(model_sd, optim_sd), storage_reader=HuggingFaceStorageReader(str(directory / WEIGHTS_DIR)))
    for group, saved in zip(optim_sd["param_groups"], state["param_groups"]):
        group.update({key: tuple(value) if isinstance(group.get(key), tuple) else value for key, value in saved.items()})
    set_state_dict(module, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    scheduler.load_state_dict(state["scheduler"])
    rng = directory / f"rng_rank{rank}.safetensors"
    if rng.exists():  # a run resumed on more workers than it was saved with: keep the seeded RNG
        _set_rng_state(load_file(str(rng)))
    return state


def refuse_unsafe(directory: Path) -> None:
    """ValueError for a checkpoint holding pickle-based files: loading them could run code."""
    unsafe = sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*") if (p.suffix or p.name) in PICKLE_SUFFIXES)
    if unsafe:
        raise ValueError(
            f"checkpoint {directory} holds pickle-based files ({', '.join(unsafe[:3])}): they are never loaded, "
            "since unpickling a file can run code; resume only from checkpoints this version wrote "
            "(safetensors and JSON)"
        )


def read_state(directory: Path) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a fine-tuning checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text())


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest (highest step) complete checkpoint of a run directory."""
    path = Path(path).expanduser()
    if (path / STATE_FILE).exists():
        refuse_unsafe(path)
        if not is_complete(path):
            raise ValueError(f"resume_from={str(path)!r}: the checkpoint is incomplete (a rank's shard is missing)")
        return path
    if not path.is_dir():
        raise ValueError(f"resume_from={str(path)!r}: no such run or checkpoint directory")
    latest = latest_complete(path)
    if latest is None:
        raise ValueError(f"resume_from={str(path)!r}: no complete checkpoint_* directory in it")
    refuse_unsafe(latest)
    return latest


def latest_complete(run_dir: Path) -> Path | None:
    """The highest-step checkpoint of a run directory whose every shard was written."""
    found = [(read_state(d)["step"], d) for d in checkpoint_dirs(run_dir) if is_complete(d)]
    return max(found)[1] if found else None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(d for d in Path(run_dir).glob("checkpoint_*") if d.is_dir())


def is_complete(directory: Path) -> bool:
    """The trainer state exists, and every rank's weight files exist at their full size."""
    directory = Path(directory)
    if not (directory / STATE_FILE).exists():
        return False
    for rank in range(read_state(directory).get("world", 1)):
        listing = directory / f"rank{rank}.json"
        if not listing.exists():
            return False
        for name, size in json.loads(listing.read_text())["files"].items():
            shard = directory / WEIGHTS_DIR / name
            if not shard.exists() or shard.stat().st_size != size:
                return False
    return True


def _tensors(model_sd: dict, optim_sd: dict) -> dict:
    """Model and optimizer tensors under flat names (the same tensor objects, so a load fills them).

    A tensor reached under several names (tied input and output embeddings) is kept under its
    first name only: safetensors refuses shared memory, and loading that one name fills the
    tensor every name shares."""
    flat, seen = {}, set()
    for name, tensor in model_sd.items():
        if isinstance(tensor, torch.Tensor) and not _is_sharded(tensor):
            key = storage_key(tensor)
            if key in seen:
                continue
            seen.add(key)
        flat[f"model.{name}"] = tensor
    for param, slots in optim_sd["state"].items():
        for slot, value in slots.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"optimizer state {param}.{slot} is not a tensor: it cannot be checkpointed")
            flat[f"optim.{param}.{slot}"] = value
    return flat


def storage_key(tensor: torch.Tensor) -> tuple:
    """Equal for two tensor objects that are views of the same memory (a state dict gives tied
    weights as distinct objects over one storage)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[f"cuda{i}"] for i in range(len(state) - 1) if f"cuda{i}" in state]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
