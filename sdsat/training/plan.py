"""Driver-side preparation of a fine-tuning run: everything that can refuse a bad config
is checked here, before any worker starts (model, SAT count, data, resume, export).

``cfg`` is the run's configuration as a plain dict (``FinetuneConfig.model_dump()`` of
sdsat/training/config.py, with ``name`` set)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model.draft_head import HeadConfig
from ..model.load import resolve_path, sat_config_dir
from ..model.sat import CONFIG_FILE, SATConfig
from .checkpoint import find_checkpoint, read_state
from .data import load_texts, pack
from .distill import read_prompts
from .storage import is_uri, join

log = logging.getLogger(__name__)


@dataclass
class Plan:
    run_name: str
    run_dir: str  # a local path or a URI (storage.py)
    export_dir: str  # a local path or a URI
    train_rows: np.ndarray  # [N, row_len] int32 token rows
    val_rows: np.ndarray | None  # [M, row_len], None without validation
    resume_from: str | None  # a checkpoint directory
    model_sats: int  # SATs the model has as the worker loads it ("default": the shipped artifact's; 0: they are added)


def prepare(cfg: dict) -> Plan:
    tokenizer, model_sats = check_model(cfg)
    train_rows = packed_rows(cfg, tokenizer, "train")
    val_rows = packed_rows(cfg, tokenizer, "validation") if cfg["eval_every"] else None
    name = cfg["name"]
    run_dir = join(cfg["storage_path"], name)
    if cfg["export_dir"] is None:
        export_dir = join(run_dir, "export")
    else:  # absolute: Ray Train workers run in their own working directory
        export_dir = cfg["export_dir"] if is_uri(cfg["export_dir"]) else str(Path(cfg["export_dir"]).expanduser().resolve())
    if not is_uri(export_dir):
        check_export_dir(Path(export_dir))
    if cfg["resume_from"] and is_uri(cfg["resume_from"]):
        raise ValueError(f"resume_from={cfg['resume_from']!r}: give a local or shared path (a run kept at a URI "
                         "resumes when it is started again with the same name and storage_path)")
    resume = str(check_resume(cfg)) if cfg["resume_from"] else None
    if cfg["distill_max_new_tokens"] and cfg["distill_prompts"]:
        prompts = read_prompts(cfg["distill_prompts"])
        too_big = max(max(p) for p in prompts)
        if too_big >= len(tokenizer):
            raise ValueError(f"distill_prompts={cfg['distill_prompts']!r}: token id {too_big} is beyond the vocabulary "
                             f"of model {cfg['model']!r} ({len(tokenizer)} tokens)")
    return Plan(name, run_dir, export_dir, train_rows, val_rows, resume, model_sats)


def check_model(cfg: dict):
    """The model's tokenizer (the base model's, without SAT tokens) and SAT count as the worker
    will load it ("default" with its shipped artifact, an artifact directory with its own SATs);
    refuses an unknown model, num_sat beyond its SATs and keep_head without a draft head of
    width draft_head (the worker's select_trainable would refuse it only after Ray started and
    self-distillation ran)."""
    from transformers import AutoTokenizer

    try:
        path = resolve_path(cfg["model"])
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model={cfg['model']!r}: cannot load it ({exc})") from None
    sat = loaded_sat_config(cfg["model"], path)
    if sat is not None and cfg["num_sat"] > sat.num_sat:
        raise ValueError(f"num_sat={cfg['num_sat']} is larger than the {sat.num_sat} SATs of model {cfg['model']!r}")
    width = cfg.get("draft_head", 0)
    if width and cfg.get("keep_head", False):
        head = HeadConfig(**sat.head).width if sat is not None and sat.head else None  # as load_model attaches it
        if head != width:
            found = "none" if head is None else f"width {head}"
            raise ValueError(f"keep_head: the model {cfg['model']!r} has no draft head of width {width} to continue ({found})")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, sat.num_sat if sat else 0


def loaded_sat_config(name: str, path: str) -> SATConfig | None:
    """The SAT config load_model(name) reads (its SATs, adapter and draft head), without
    loading weights: the SAT artifact's for "default" (the shipped one) or an artifact
    directory, else the checkpoint directory's own; None for a hub id or a model without SATs.
    ``path``: resolve_path(name)."""
    directory = sat_config_dir(name, path)
    return SATConfig.load(directory) if directory is not None else None


def packed_rows(cfg: dict, tokenizer, split: str) -> np.ndarray:
    """Token rows of row_len; ValueError for an unknown dataset or an empty/too small corpus."""
    texts = load_texts(cfg["dataset"], split, text_field=cfg["text_field"], chat=cfg["chat"], tokenizer=tokenizer, limit=cfg["max_texts"],
                       data_dir=cfg["data_dir"])
    try:
        ds = pack(texts, tokenizer, cfg["row_len"])
    except ValueError as exc:
        raise ValueError(f"dataset={cfg['dataset']!r} ({split}): {exc}") from None
    rows = np.asarray(ds.with_format("numpy")["input_ids"], dtype=np.int32)
    log.info("%s: %d texts -> %d rows of %d tokens", split, len(texts), len(rows), cfg["row_len"])
    return rows


def check_export_dir(export_dir: Path) -> None:
    """Never overwrite something that is not an earlier export of this job."""
    if export_dir.exists() and any(export_dir.iterdir()) and not (export_dir / CONFIG_FILE).exists():
        raise ValueError(f"export_dir {export_dir} exists and is not an SDSAT export: choose another directory")


def check_resume(cfg: dict) -> Path:
    checkpoint = find_checkpoint(cfg["resume_from"])
    saved = read_state(checkpoint)["config"]
    for field in ("model", "num_sat", "train", "sat_repeated"):
        if saved.get(field) != cfg[field]:
            raise ValueError(f"resume_from {checkpoint}: it was trained with {field}={saved.get(field)!r}, this run has {cfg[field]!r}")
    return checkpoint
