"""FSDP2 set-up for models that do not fit one device (a 7B full fine-tune).

No rank builds the model it trains on the host: every rank builds it on the meta device,
shards it (one FSDP group per decoder layer, then the rest), and allocates only its own
shards on its device. Rank 0 alone loads the base weights (on the host, with the SATs
added) and they are broadcast shard by shard (``broadcast_from_rank0``). Compute runs in
bf16 under an FSDP MixedPrecisionPolicy with fp32 master weights and fp32 gradient
reduction; activation checkpointing recomputes each decoder layer in the backward pass.

In adapter mode (train=sat_adapter) the frozen base stays in its stored dtype (fp32 shards)
and the policy casts it for compute, so every FSDP group holds parameters of one dtype.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..model.adapter import AdapterConfig, attach_adapter
from ..model.load import LoadedModel, resolve_path
from ..model.sat import SATConfig
from .setup import LossModule, build_model, loss_config, select_trainable

log = logging.getLogger(__name__)


def build_sharded(cfg: dict, rank: int, device: torch.device) -> tuple[LoadedModel, LossModule, dict]:
    """(the skeleton's LoadedModel, the sharded LossModule, optimizer options); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = build_model(cfg) if rank == 0 else None  # the host copy, rank 0 only
    shared = [full.sat if full is not None else None]
    dist.broadcast_object_list(shared, src=0, device=device)  # NCCL sends objects through the device
    skeleton = meta_model(cfg, shared[0])
    if full is not None:
        skeleton.tokenizer = full.tokenizer  # with the SATs added: rank 0 exports it
    sat_ids = skeleton.sat.ids_for(cfg["num_sat"])
    options = select_trainable(skeleton.model, sat_ids, cfg, cast_frozen=False)
    if full is not None:
        select_trainable(full.model, sat_ids, cfg, cast_frozen=False)  # the same adapter (rank 0's draws broadcast)
    if cfg["activation_checkpointing"]:
        skeleton.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = LossModule(skeleton.model, loss_config(cfg, skeleton.sat.unique_ids))
    buffers = {name: b.clone() for name, b in module.named_buffers()}  # real: built on the host
    shard(module, cfg)
    module.to_empty(device=device)
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name].to(device))
    weights = {f"model.{k}": v for k, v in full.model.state_dict().items()} if full is not None else {}
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full, weights
    return skeleton, module, options


def meta_model(cfg: dict, sat: SATConfig) -> LoadedModel:
    """The model with its SATs (and the adapter it brings, if any) on the meta device:
    parameters without storage, buffers (rotary tables) real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_path(cfg["model"])
    config = AutoConfig.from_pretrained(path)
    config.vocab_size = max(config.vocab_size, max(sat.sat_ids) + 1)  # the rows add_sat_tokens gives rank 0's copy
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=cfg["attn_implementation"])
    if sat.adapter:
        attach_adapter(model, sat.sat_ids, AdapterConfig(**sat.adapter))
    tokenizer = AutoTokenizer.from_pretrained(path)  # for the pad id; rank 0 exports its own copy's
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, sat=sat, source=cfg["model"], path=path)


def shard(module: LossModule, cfg: dict) -> None:
    """fully_shard each decoder layer, then the root (embeddings, norm, head, adapter)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layer_classes = set(getattr(module.model, "_no_split_modules", None) or [])
    layers = [m for m in module.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"strategy=fsdp: cannot find the decoder layers of {type(module.model).__name__}")
    bf16 = cfg["precision"] == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    log.info("FSDP: %d decoder layers sharded over %d ranks (compute %s, activation checkpointing %s)", len(layers),
             dist.get_world_size(), "bf16" if bf16 else "fp32", "on" if cfg["activation_checkpointing"] else "off")
