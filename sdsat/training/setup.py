"""Per-worker set-up of a fine-tuning run: the model with its SATs, what trains, the
parallel wrapper, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch

from ..model.adapter import AdapterConfig, attach_adapter, get_adapter
from ..model.draft_head import HeadConfig, attach_head, get_head, remove_head
from ..model.load import LoadedModel, load_model
from ..model.sat import add_sat_tokens
from .frozen_loss import FrozenLossConfig, frozen_loss
from .loss import LossConfig, sdsat_loss

log = logging.getLogger(__name__)


class LossModule(torch.nn.Module):
    """The model plus the SDSAT loss, so DDP/FSDP see the loss computation as one forward."""

    def __init__(self, model: torch.nn.Module, loss_cfg: LossConfig | FrozenLossConfig):
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg

    def forward(self, batch: dict):
        if isinstance(self.loss_cfg, FrozenLossConfig):
            return frozen_loss(self.model, batch, self.loss_cfg)
        return sdsat_loss(self.model, batch, self.loss_cfg)


def loss_config(cfg: dict, sat_ids: list[int]) -> LossConfig | FrozenLossConfig:
    if cfg["train"] == "sat_adapter":
        return FrozenLossConfig(banned_ids=tuple(sat_ids), num_sat=cfg["num_sat"], w_teacher=cfg["w_teacher"],
                                w_kl=cfg["w_kl"], w_sat=cfg["w_sat"], w_head=cfg.get("w_head", 1.0) if cfg.get("draft_head", 0) else 0.0,
                                sat_grad=not cfg.get("freeze_adapter", False))
    return LossConfig(w_std=cfg["w_std"], w_sat=cfg["w_sat"], banned_ids=tuple(sat_ids), num_sat=cfg["num_sat"])


def build_model(cfg: dict) -> LoadedModel:
    """The base model in fp32 on CPU, with its SATs (added, seeded, when it has none)."""
    loaded = load_model(cfg["model"], dtype="float32", device="cpu", attn_implementation=cfg["attn_implementation"])
    if loaded.sat is None:
        loaded.sat = add_sat_tokens(
            loaded.model,
            loaded.tokenizer,
            cfg["num_sat"],
            repeated=cfg["sat_repeated"],
            init=cfg["sat_init"],
            seed=cfg["seed"],
            base_model=cfg["model"],
        )
    loaded.sat.ids_for(cfg["num_sat"])  # refuses k beyond the model's SATs
    return loaded


def select_trainable(model: torch.nn.Module, sat_ids: list[int], cfg: dict, cast_frozen: bool = True) -> dict:
    """Set requires_grad for the training mode; return the optimizer options (lr, weight_decay)
    of the trainable parameters (collected after wrapping: FSDP replaces parameters).

    full: every parameter, one group at lr.
    sat_embeddings: only the input embedding trains, and a gradient hook zeroes every row
    but the SAT rows, so the base model stays bit-identical (AdamW moves a row only when
    it has had a gradient; weight decay is off for this group).
    sat_adapter: the base model is frozen (and, with precision=bf16 and cast_frozen, cast to
    bf16: it needs no fp32 master copy; under FSDP the mixed-precision policy casts instead); a SAT adapter (sdsat/model/adapter.py, fp32) trains, its SAT rows at
    sat_lr and its low-rank deltas at lr. Standard tokens then run without gradients.
    With draft_head > 0 a fresh draft head (fp32, seeded) trains too, at lr (with keep_head,
    the loaded model's own head, in fp32); with freeze_adapter only the head trains.
    """
    if cfg["train"] == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return {"lr": cfg["lr"], "weight_decay": cfg["weight_decay"]}
    if cfg["train"] == "sat_embeddings":
        for p in model.parameters():
            p.requires_grad_(False)
        weight = model.get_input_embeddings().weight
        weight.requires_grad_(True)
        row_mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)  # [V, 1]
        row_mask[sorted(set(sat_ids))] = 1.0
        weight.register_hook(lambda grad: grad * row_mask.to(grad.device, grad.dtype))
        return {"lr": cfg["sat_lr"] or cfg["lr"], "weight_decay": 0.0}
    if cfg["train"] == "sat_adapter":
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg["precision"] == "bf16" and cast_frozen:
            model.to(torch.bfloat16)
        adapter = get_adapter(model)
        if adapter is None:
            adapter_cfg = AdapterConfig(cfg["adapter_rank"], cfg["adapter_alpha"], tuple(cfg["adapter_targets"].split(",")))
            adapter = attach_adapter(model, sat_ids, adapter_cfg)
        adapter.float()
        for p in adapter.parameters():
            p.requires_grad_(not cfg.get("freeze_adapter", False))
        if cfg.get("draft_head", 0) and cfg.get("keep_head", False):
            head = get_head(model)
            if head is None or head.cfg.width != cfg["draft_head"]:
                found = "none" if head is None else f"width {head.cfg.width}"
                raise ValueError(f"keep_head: the model {cfg['model']!r} has no draft head of width "
                                 f"{cfg['draft_head']} to continue ({found})")
            head.float().requires_grad_(True)
        elif cfg.get("draft_head", 0):
            remove_head(model)  # a fresh head, whatever the loaded model had
            torch.manual_seed(cfg["seed"])
            attach_head(model, HeadConfig(cfg.get("draft_head", 0))).requires_grad_(True)
        return {"lr": cfg["lr"], "weight_decay": cfg["weight_decay"], "sat_lr": cfg["sat_lr"] or cfg["lr"]}
    raise ValueError(f"unknown train mode {cfg['train']!r}; choose full, sat_embeddings or sat_adapter")


def wrap(module: LossModule, cfg: dict, device: torch.device, world_size: int) -> torch.nn.Module:
    """The module on its device, in DDP (replicas, gradient all-reduce) when there are several
    ranks. (strategy=fsdp builds its sharded module in sdsat/training/fsdp.py instead.)"""
    if cfg["activation_checkpointing"]:
        module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module.to(device)
    if world_size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device] if device.type == "cuda" else None
    # Buffers (rotary tables) are the same on every rank: no per-forward broadcast.
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def make_optimizer(module: torch.nn.Module, options: dict, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with a ``sat_lr`` option, the adapter's SAT rows
    form their own group at that lr (no weight decay)."""
    options = dict(options)
    sat_lr = options.pop("sat_lr", None)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if sat_lr is None:
        params = [p for _, p in named]
    else:
        params = [
            {"params": [p for n, p in named if not n.endswith("sat_embed")]},
            {"params": [p for n, p in named if n.endswith("sat_embed")], "lr": sat_lr, "weight_decay": 0.0},
        ]
    return torch.optim.AdamW(params, betas=(0.9, 0.95), fused=device.type == "cuda", **options)


class Schedule:
    """Linear warm-up to each group's lr, then cosine decay to ``floor`` of it at ``total``
    steps. ``total`` may be lowered once the run knows how many steps fit its time budget;
    LambdaLR saves and restores this object's attributes with the scheduler's state."""

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: dict) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(cfg["warmup_steps"], cfg["max_steps"], cfg["min_lr_ratio"]))


def schedule_of(scheduler: torch.optim.lr_scheduler.LambdaLR) -> Schedule:
    return scheduler.lr_lambdas[0]
