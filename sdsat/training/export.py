"""The final export of a fine-tuning run: a plain Hugging Face checkpoint directory, or a
SAT artifact (sdsat_config.json, the adapter's weights and the draft head's, if any), in a directory or at a URI.

Streamed: the weights go from the training module to safetensors files one tensor at a
time (a sharded tensor is gathered alone, then written by rank 0 in export_dtype), in
files of at most MAX_FILE_BYTES with a Hugging Face index, so no rank ever holds a second
model. Collective under FSDP: every rank calls it.

The recorded recipe (sdsat_config.json) keeps the fields that shape the weights, not where
this run kept its files (RUN_ONLY_FIELDS).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from ..model.adapter import ATTR as ADAPTER_ATTR
from ..model.adapter import WEIGHTS_FILE as ADAPTER_FILE
from ..model.adapter import get_adapter
from ..model.draft_head import ATTR as HEAD_ATTR
from ..model.draft_head import WEIGHTS_FILE as HEAD_FILE
from ..model.draft_head import get_head
from ..model.load import LoadedModel, parse_dtype
from .checkpoint import storage_key
from .progress import Progress
from .storage import is_uri, upload

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 4 * 2**30
# Where a run kept its files, how it was named and tested: not part of the recipe.
RUN_ONLY_FIELDS = ("name", "storage_path", "export_dir", "resume_from", "distill_cache", "fail_at_step",
                   "keep_checkpoints", "max_failures")


def recipe(cfg: dict) -> dict:
    return {key: value for key, value in cfg.items() if key not in RUN_ONLY_FIELDS}


def export(module, loaded: LoadedModel, cfg: dict, location: str, rank: int) -> str | None:
    """Write the export to ``location``, a directory (replacing an earlier export only once
    complete) or a URI (written locally, then copied up); its location on rank 0, else None."""
    if is_uri(location):
        with tempfile.TemporaryDirectory() as tmp:
            written = export(module, loaded, cfg, str(Path(tmp) / "export"), rank)
            if written is not None:
                upload(Path(written), location)
                log.info("copied the export to %s", location)
        return location if rank == 0 else None
    dtype = parse_dtype(cfg["export_dtype"])
    directory = Path(location).expanduser()
    staging = directory.with_name(directory.name + ".partial")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    base, adapter, head = [], [], []
    for name, tensor in _named_tensors(module, loaded, cfg, rank):
        part = adapter if name.startswith(ADAPTER_ATTR + ".") else head if name.startswith(HEAD_ATTR + ".") else base
        part.append((name, tensor))
    if cfg["export_format"] == "checkpoint":
        _write_weights(base, staging, dtype, rank)
    adapter_tensors = _gather(adapter, dtype, rank)
    head_tensors = _gather(head, dtype, rank)
    if rank != 0:
        return None
    sat = replace(loaded.sat, num_sat_trained=cfg["num_sat"], recipe=recipe(cfg))
    trained_adapter = get_adapter(loaded.model)
    if trained_adapter is not None:
        tensors = {name.removeprefix(ADAPTER_ATTR + "."): t for name, t in adapter_tensors.items()}
        # The layout SATAdapter.save writes and SATAdapter.load_weights reads.
        save_file(tensors, str(staging / ADAPTER_FILE), metadata={"sat_ids": ",".join(map(str, trained_adapter.sat_ids))})
        sat = replace(sat, adapter=trained_adapter.cfg.to_dict())
    trained_head = get_head(loaded.model)
    if trained_head is not None:  # the layout DraftHead.save writes and DraftHead.load_weights reads
        save_file({name.removeprefix(HEAD_ATTR + "."): t for name, t in head_tensors.items()}, str(staging / HEAD_FILE))
        sat = replace(sat, head=trained_head.cfg.to_dict())
    if cfg["export_format"] == "checkpoint":
        config = copy.deepcopy(loaded.model.config)
        config.dtype = dtype
        config.save_pretrained(staging)
        if getattr(loaded.model, "generation_config", None) is not None:
            loaded.model.generation_config.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
    sat.save(staging)
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)
    log.info("exported the fine-tuned model to %s", directory)
    return str(directory)


def _named_tensors(module, loaded: LoadedModel, cfg: dict, rank: int) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model, in state-dict order, tied duplicates once. In adapter
    mode with a base cast to bf16 for training (DDP, precision bf16) and a wider export
    dtype, rank 0 reads the base as loaded instead, so the export keeps it bit-identical."""
    base_cast = (cfg["train"] == "sat_adapter" and cfg["export_format"] == "checkpoint"
                 and not isinstance(next(iter(module.parameters())), DTensor)
                 and loaded.dtype != parse_dtype(cfg["export_dtype"]) and loaded.dtype == torch.bfloat16)
    if base_cast:  # not sharded: only rank 0 writes, and nothing here is collective
        if rank != 0:
            return []
        from .setup import build_model

        extra = (f"{ADAPTER_ATTR}.", f"{HEAD_ATTR}.")
        state = {f"model.{k}": v for k, v in build_model(cfg).model.state_dict().items() if not k.startswith(extra)}
        state |= {k: v for k, v in get_model_state_dict(module).items() if k.removeprefix("model.").startswith(extra)}
    else:
        state = get_model_state_dict(module)
    seen, named = set(), []
    for name, tensor in state.items():  # tied weights are distinct objects over one storage
        key = id(tensor) if isinstance(tensor, DTensor) else storage_key(tensor)
        if key not in seen:
            seen.add(key)
            named.append((name.removeprefix("model."), tensor))
    return named


def _gather(named: list[tuple[str, torch.Tensor]], dtype: torch.dtype, rank: int) -> dict[str, torch.Tensor]:
    """Full copies on rank 0's host, in ``dtype`` (collective for sharded tensors)."""
    out = {}
    for name, tensor in named:
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if rank == 0:
            out[name] = full.detach().to("cpu", dtype).contiguous()
    return out


def _write_weights(named: list[tuple[str, torch.Tensor]], directory: Path, dtype: torch.dtype, rank: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors files and their index."""
    total = sum(t.numel() for _, t in named) * dtype.itemsize
    progress = Progress("export", total / 2**20, "MB", log) if rank == 0 else None
    files, current, size, done = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            path = directory / f"part-{len(files):05d}.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
            files.append((path, list(current)))
        current, size = {}, 0

    for name, tensor in named:
        part = _gather([(name, tensor)], dtype, rank)
        if rank != 0:
            continue
        current[name] = part[name]
        size += part[name].numel() * dtype.itemsize
        done += part[name].numel() * dtype.itemsize
        progress.update(done / 2**20)
        if size >= MAX_FILE_BYTES:
            flush()
    if rank != 0:
        return
    flush()
    if len(files) == 1:
        files[0][0].rename(directory / "model.safetensors")
        return
    weight_map = {}
    for i, (path, names) in enumerate(files, 1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        path.rename(directory / final)
        weight_map |= dict.fromkeys(names, final)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
