"""Loading causal LMs (the embedded default or any Hugging Face path or id) with their SATs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .adapter import ATTR as ADAPTER_ATTR
from .adapter import AdapterConfig, attach_adapter, get_adapter, has_adapter_file
from .draft_head import ATTR as HEAD_ATTR
from .draft_head import WEIGHTS_FILE as HEAD_WEIGHTS
from .draft_head import HeadConfig, attach_head, get_head
from .default_model import DEFAULT_NAME, default_checkpoint
from .sat import CONFIG_FILE, SATConfig, add_sat_tokens

log = logging.getLogger(__name__)

BASE_NAME = "default-base"  # the default model without the shipped SAT artifact
# The shipped artifact of the default model: SAT rows and adapter (sdsat_config.json +
# sdsat_adapter.safetensors), made by jobs/finetune.py --config configs/finetune_artifact.yaml.
DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "default"

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
    """A local checkpoint directory, or a hub id left for transformers to resolve.

    "default" and "default-base" both resolve to the base default checkpoint; a SAT
    artifact directory (sdsat_config.json without config.json) to its base model's.
    """
    if name in (DEFAULT_NAME, BASE_NAME):
        return str(default_checkpoint())
    expanded = Path(name).expanduser()
    if expanded.exists():
        if is_sat_artifact(expanded):
            return resolve_path(SATConfig.load(expanded).base_model)
        if not (expanded / "config.json").exists():
            raise FileNotFoundError(f"{name}: not a model checkpoint directory (no config.json)")
        return str(expanded)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_like_path:
        raise FileNotFoundError(f"model path {name!r} does not exist")
    return name


def is_sat_artifact(directory: str | Path) -> bool:
    """A directory holding only SATs (and an adapter) for a base model named in its config."""
    directory = Path(directory)
    return (directory / CONFIG_FILE).exists() and not (directory / "config.json").exists()


def artifact_dir(name: str) -> Path | None:
    """The SAT artifact a model name brings along: the shipped one for "default" (when
    present), the directory itself for an artifact directory, else None."""
    if name == DEFAULT_NAME:
        return DEFAULT_ARTIFACT if (DEFAULT_ARTIFACT / CONFIG_FILE).exists() else None
    if name != BASE_NAME and Path(name).expanduser().is_dir() and is_sat_artifact(Path(name).expanduser()):
        return Path(name).expanduser()
    return None


def sat_config_dir(name: str, path: str) -> Path | None:
    """Where load_model(name) reads its SAT config (SATs, adapter, draft head): the artifact the
    name brings along, else the checkpoint directory ``path`` (resolve_path(name)); None for a
    hub id."""
    return artifact_dir(name) or (Path(path) if Path(path).is_dir() else None)


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

    name: "default" (the default model with its shipped SAT artifact, if the repo has one),
    "default-base" (the default model alone), a checkpoint directory, a SAT artifact
    directory (SATs and adapter for the base model it names), or a Hugging Face id.
    add_sat: if the checkpoint has no SATs, add this many untrained ones (0: add none).
    A checkpoint or artifact with a SAT adapter gets it attached (it acts only at SAT positions).
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
    artifact = artifact_dir(name)
    sat_dir = sat_config_dir(name, path)
    sat = SATConfig.load(sat_dir) if sat_dir is not None else None
    if artifact is not None:
        _add_artifact_tokens(model, tokenizer, sat, artifact)
    if sat is not None and sat.adapter:
        if not has_adapter_file(sat_dir):
            raise FileNotFoundError(f"{sat_dir}: its {CONFIG_FILE} names an adapter but the weights file is missing")
        adapter = attach_adapter(model, sat.sat_ids, AdapterConfig(**sat.adapter))
        adapter.load_weights(sat_dir)
        model.eval()
    if sat is not None and sat.head:
        attach_head(model, HeadConfig(**sat.head)).load_weights(sat_dir)
        model.eval()
    if sat is None and add_sat:
        sat = add_sat_tokens(model, tokenizer, add_sat, repeated=sat_repeated, base_model=name)
        log.warning("model %s: added %d untrained SATs (drafts will rarely be accepted)", name, add_sat)
    elif sat is not None and add_sat > sat.num_sat:
        raise ValueError(f"model {name!r} has {sat.num_sat} SATs; cannot use {add_sat}")
    return LoadedModel(model=model, tokenizer=tokenizer, sat=sat, source=name, path=path)


def _add_artifact_tokens(model, tokenizer, sat: SATConfig, artifact: Path) -> None:
    """Add an artifact's SAT tokens to its base model; they must get the ids it was trained with."""
    added = add_sat_tokens(model, tokenizer, sat.num_sat, repeated=sat.repeated, base_model=sat.base_model)
    if added.sat_ids != sat.sat_ids or added.sat_tokens != sat.sat_tokens:
        raise ValueError(f"{artifact}: its SATs {sat.sat_tokens} {sat.sat_ids} do not fit the base model's tokenizer "
                         f"(adding them gave ids {added.sat_ids})")


def save_model(loaded: LoadedModel, directory: str | Path) -> Path:
    """Save model, tokenizer and SAT config as a plain Hugging Face checkpoint directory.

    A SAT adapter and a draft head go to their own files (sdsat_adapter.safetensors,
    sdsat_head.safetensors), not into the model's weights.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    extras = {attr: module for attr, module in ((ADAPTER_ATTR, get_adapter(loaded.model)), (HEAD_ATTR, get_head(loaded.model)))
              if module is not None}
    for attr in extras:
        delattr(loaded.model, attr)  # keep their tensors out of model.safetensors
    try:
        loaded.model.save_pretrained(out)
    finally:
        for attr, module in extras.items():
            setattr(loaded.model, attr, module)
    loaded.tokenizer.save_pretrained(out)
    for module in extras.values():
        module.save(out, dtype=loaded.dtype)
    if loaded.sat is not None:
        _with_extras(loaded).save(out)
    return out


def _with_extras(loaded: LoadedModel) -> SATConfig:
    """The SAT config naming the model's adapter and draft head (empty where it has none)."""
    adapter, head = get_adapter(loaded.model), get_head(loaded.model)
    return replace(loaded.sat, adapter=adapter.cfg.to_dict() if adapter is not None else {},
                   head=head.cfg.to_dict() if head is not None else {})


def save_artifact(loaded: LoadedModel, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save only what SATs add to the base model: sdsat_config.json (whose base_model names
    the base), the adapter's weights (SAT rows and low-rank deltas) and the draft head's, if
    any, in ``dtype``.
    load_model(directory) loads the base model with them applied."""
    adapter = get_adapter(loaded.model)
    if adapter is None or loaded.sat is None:
        raise ValueError("only a model with SATs and a SAT adapter can be saved as an artifact (train: sat_adapter)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    adapter.save(out, dtype=dtype)
    head = get_head(loaded.model)
    if head is not None:
        head.save(out, dtype=dtype)
    elif (out / HEAD_WEIGHTS).exists():
        (out / HEAD_WEIGHTS).unlink()  # a stale head from an earlier export would not match
    _with_extras(loaded).save(out)
    return out
