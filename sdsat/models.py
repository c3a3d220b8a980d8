"""Loading causal LMs (the embedded default or any Hugging Face path or id) with their SATs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .default_model import DEFAULT_NAME, default_checkpoint
from .sat import SATConfig, add_sat_tokens

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    sat: SATConfig | None  # None: the model has no SATs
    source: str  # what the caller asked for ("default", a path or an id)
    path: str  # the checkpoint directory or id actually loaded

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def require_sat(self, k: int) -> list[int]:
        """SAT ids for drafting k tokens, with a clear error when the model cannot."""
        if k == 0:
            return []
        if self.sat is None:
            raise ValueError(
                f"model {self.source!r} has no SATs: fine-tune it with jobs/finetune.py, "
                "or pass add_sat=K to load it with untrained SATs (only useful for oracle benchmarks)"
            )
        return self.sat.ids_for(k)


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16")
    if resolved == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError("float16 is for GPUs; on CPU use bfloat16 or float32")
    return resolved


def resolve_path(name: str) -> str:
    """A local checkpoint directory, or a hub id left for transformers to resolve."""
    if name == DEFAULT_NAME:
        return str(default_checkpoint())
    expanded = Path(name).expanduser()
    if expanded.exists():
        if not (expanded / "config.json").exists():
            raise FileNotFoundError(f"{name}: not a model checkpoint directory (no config.json)")
        return str(expanded)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_like_path:
        raise FileNotFoundError(f"model path {name!r} does not exist")
    return name


def load_model(
    name: str = DEFAULT_NAME,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    add_sat: int = 0,
    sat_repeated: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer and SAT config.

    add_sat: if the checkpoint has no SATs, add this many untrained ones (0: add none).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype, device)
    path = resolve_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load model {name!r}: {exc}") from exc
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ValueError(f"model {name!r} ({config.model_type}) is not a causal language model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and (tokenizer.model_max_length or 0) > max_positions:
        tokenizer.model_max_length = max_positions
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sat = SATConfig.load(path) if Path(path).is_dir() else None
    if sat is None and add_sat:
        sat = add_sat_tokens(model, tokenizer, add_sat, repeated=sat_repeated, base_model=name)
        log.warning("model %s: added %d untrained SATs (drafts will rarely be accepted)", name, add_sat)
    elif sat is not None and add_sat > sat.num_sat:
        raise ValueError(f"model {name!r} has {sat.num_sat} SATs; cannot use {add_sat}")
    return LoadedModel(model=model, tokenizer=tokenizer, sat=sat, source=name, path=path)


def save_model(loaded: LoadedModel, directory: str | Path) -> Path:
    """Save model, tokenizer and SAT config as a plain Hugging Face checkpoint directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    if loaded.sat is not None:
        loaded.sat.save(out)
    return out
