"""The SDSAT training loss: w_std * CE(standard tokens) + w_sat * CE(SAT tokens).

A pure function of (model, batch) where the batch comes from :func:`sdsat.rows.collate`.
The LM head runs only at labelled positions: the decoder gives hidden states, the
labelled ones are gathered, and only they go through the output embedding.

SAT ids are never predicted: decoding bans them from every argmax, so here their logits
are masked out (set to finfo.min) at every labelled position before the cross-entropy and
the accuracy. The CEs are then those of the distribution decoding actually uses, and the
SAT rows of a tied LM head get no gradient from the output side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rows import IGNORE


@dataclass
class LossConfig:
    w_std: float = 1.0  # weight of the standard-token CE
    w_sat: float = 1.0  # weight of the SAT-token CE
    # Ids never predicted (the model's SAT ids); None: the SAT ids present in the batch.
    banned_ids: tuple[int, ...] | None = None
    num_sat: int = 0  # length of sat_acc; 0: the largest SAT offset in the batch

    def __post_init__(self):
        if self.w_std < 0 or self.w_sat < 0 or self.w_std + self.w_sat == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got w_std={self.w_std}, w_sat={self.w_sat}")


def sdsat_loss(model, batch: dict, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """Loss and metrics for one batch.

    Metrics: ce_std, ce_sat (mean CE, 0.0 where there are no such labels), sat_acc
    (top-1 accuracy per SAT offset 1..k, nan for an offset without labels), sat_count
    (labels per offset), n_std, n_sat (label counts).
    """
    labels = batch["labels"]  # [B, T]
    sat_offset = batch["sat_offset"]  # [B, T]
    out = model.get_decoder()(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,
    )
    hidden = out.last_hidden_state  # [B, T, H]
    labelled = labels != IGNORE  # [B, T]
    h = hidden[labelled]  # [N, H]
    target = labels[labelled]  # [N]
    offset = sat_offset[labelled]  # [N]
    is_sat = offset > 0  # [N]

    banned = _banned_ids(cfg, batch, hidden.device)
    head = model.get_output_embeddings()
    sat_logits = _logits(head, h[is_sat], banned)  # [N_sat, V]
    ce_sat = _mean(F.cross_entropy(sat_logits, target[is_sat], reduction="none"))
    # With w_std = 0 the standard CE is a metric only: computed without a graph.
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.w_std > 0):
        std_logits = _logits(head, h[~is_sat], banned)  # [N_std, V]
        ce_std = _mean(F.cross_entropy(std_logits, target[~is_sat], reduction="none"))
    loss = cfg.w_std * ce_std + cfg.w_sat * ce_sat

    with torch.no_grad():
        k = cfg.num_sat or int(sat_offset.max())
        if int(sat_offset.max()) > k:
            raise ValueError(f"batch has SAT offsets up to {int(sat_offset.max())} but num_sat={k}")
        correct = (sat_logits.argmax(dim=-1) == target[is_sat]).float()  # [N_sat]
        sat_off = offset[is_sat] - 1  # [N_sat], 0-based
        hits = torch.zeros(k).index_add_(0, sat_off.cpu(), correct.cpu())  # [k]
        count = torch.bincount(sat_off.cpu(), minlength=k)[:k]  # [k]
    metrics = {
        "loss": float(loss.detach()),
        "ce_std": float(ce_std.detach()),
        "ce_sat": float(ce_sat.detach()),
        "sat_acc": [n / c if c else math.nan for n, c in zip(hits.tolist(), count.tolist())],
        "sat_count": count.tolist(),
        "n_std": int((~is_sat).sum()),
        "n_sat": int(is_sat.sum()),
    }
    return loss, metrics


def _logits(head: torch.nn.Module, h: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """fp32 logits [N, V] with the banned ids' logits at finfo.min."""
    logits = head(h).float()  # [N, V]
    if banned.numel():
        logits = logits.index_fill(-1, banned, torch.finfo(logits.dtype).min)
    return logits


def _banned_ids(cfg: LossConfig, batch: dict, device: torch.device) -> torch.Tensor:
    if cfg.banned_ids is not None:
        return torch.tensor(sorted(set(cfg.banned_ids)), dtype=torch.long, device=device)
    return batch["input_ids"][batch["sat_offset"] > 0].unique().to(device)


def _mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a 1-D tensor; 0 (still part of the graph) when it is empty."""
    return values.sum() / max(values.numel(), 1)
