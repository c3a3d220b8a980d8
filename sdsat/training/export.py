"""The final export of a fine-tuning run: a plain Hugging Face checkpoint directory, or a
SAT artifact (sdsat_config.json and the adapter's weights)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..model.adapter import get_adapter
from ..model.load import LoadedModel, parse_dtype, save_artifact, save_model

log = logging.getLogger(__name__)


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
