"""The SDSAT training loss: w_std * CE(standard) + w_sat * CE(SAT) [+ w_kl * KL(teacher || SAT)].

A pure function of (model, batch) where the batch comes from :func:`sdsat.training.rows.collate`.
The LM head runs only at labelled positions: the decoder gives hidden states, the
labelled ones are gathered, and only they go through the output embedding.

SAT ids are never predicted: decoding bans them from every argmax, so here their logits
are masked out (set to finfo.min) at every labelled position before the cross-entropy and
the accuracy. The CEs are then those of the distribution decoding actually uses, and the
SAT rows of a tied LM head get no gradient from the output side.

Teacher: SAT i of anchor t predicts x_{t+i+1}, the same token the standard position t+i
predicts, and the batch already holds that standard position's distribution (the model's
own, given the true prefix). Its argmax is what verification would accept on this prefix:
``sat_agree`` reports how often the SAT's argmax equals it (the acceptance estimate on
the model's own outputs), and ``w_kl`` > 0 adds KL(teacher || SAT), the teacher detached
(self-distillation on soft targets, as Medusa-2 and EAGLE do). Both come at no extra LM-head cost.
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
    w_sat: float = 1.0  # weight of the SAT-token CE (against the data's next tokens)
    w_kl: float = 0.0  # weight of KL(model's own standard distribution at t+i || SAT i's)
    # Ids never predicted (the model's SAT ids); None: the SAT ids present in the batch.
    banned_ids: tuple[int, ...] | None = None
    num_sat: int = 0  # length of the per-offset metrics; 0: the largest SAT offset in the batch

    def __post_init__(self):
        weights = (self.w_std, self.w_sat, self.w_kl)
        if min(weights) < 0 or sum(weights) == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not all 0, got w_std={self.w_std}, w_sat={self.w_sat}, w_kl={self.w_kl}"
            )


def sdsat_loss(model, batch: dict, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """Loss and metrics for one batch.

    Metrics: loss; ce_std, ce_sat, kl_sat (means, 0.0 where there are no such labels);
    per SAT offset 1..k: sat_acc (top-1 accuracy against the labels), sat_agree (top-1
    agreement with the model's own standard prediction), sat_count (labels), with nan for
    an offset without labels; n_std, n_sat (label counts).
    """
    labels = batch["labels"]  # [B, T]
    labelled = labels != IGNORE  # [B, T]
    is_sat = batch["sat_offset"][labelled] > 0  # [N]
    target = labels[labelled]  # [N]
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,
    ).last_hidden_state[labelled]  # [N, H]

    head = model.get_output_embeddings()
    banned = _banned_ids(cfg, batch, hidden.device)
    sat_logits = _logits(head, hidden[is_sat], banned)  # [N_sat, V]
    # With w_std = 0 the standard logits are a metric and the teacher only: no graph.
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.w_std > 0):
        std_logits = _logits(head, hidden[~is_sat], banned)  # [N_std, V]
    teacher = std_logits.detach()[_teacher_index(batch)]  # [N_sat, V]

    ce_std = _mean(F.cross_entropy(std_logits, target[~is_sat], reduction="none"))
    ce_sat = _mean(F.cross_entropy(sat_logits, target[is_sat], reduction="none"))
    kl_sat = _mean(_kl(teacher, sat_logits)) if cfg.w_kl > 0 else torch.zeros((), device=hidden.device)
    loss = cfg.w_std * ce_std + cfg.w_sat * ce_sat + cfg.w_kl * kl_sat

    metrics = {
        "loss": float(loss.detach()),
        "ce_std": float(ce_std.detach()),
        "ce_sat": float(ce_sat.detach()),
        "kl_sat": float(kl_sat.detach()),
        **_per_offset(sat_logits, target[is_sat], teacher, batch["sat_offset"][labelled][is_sat], cfg.num_sat),
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


def _teacher_index(batch: dict) -> torch.Tensor:
    """[N_sat]: for each labelled SAT (anchor t, offset i), the row among the labelled
    standard positions of standard position t+i (labelled exactly when the SAT is)."""
    labels, offset, positions = batch["labels"], batch["sat_offset"], batch["position_ids"]
    std = (labels != IGNORE) & (offset == 0)  # [B, T]
    slot = torch.full(labels.shape, -1, dtype=torch.long, device=labels.device)  # [B, T]
    slot[std] = torch.arange(int(std.sum()), device=labels.device)
    sat = (labels != IGNORE) & (offset > 0)  # [B, T]
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)  # [B, T]
    # A standard token's index in its row is its position id.
    return slot[rows[sat], positions[sat]]


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) per row. [N, V], [N, V] -> [N]"""
    log_t = F.log_softmax(teacher, dim=-1)
    return F.kl_div(F.log_softmax(student, dim=-1), log_t, log_target=True, reduction="none").sum(-1)


def _per_offset(
    sat_logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor, offset: torch.Tensor, num_sat: int
) -> dict:
    """sat_acc, sat_agree, sat_count per offset 1..k (nan where an offset has no labels)."""
    top = offset.max().item() if offset.numel() else 0
    k = num_sat or top
    if top > k:
        raise ValueError(f"batch has SAT offsets up to {top} but num_sat={k}")
    with torch.no_grad():
        guess = sat_logits.argmax(dim=-1)  # [N_sat]
        index = (offset - 1).cpu()  # [N_sat], 0-based
        count = torch.bincount(index, minlength=k)[:k].tolist()

        def rate(hit: torch.Tensor) -> list[float]:
            hits = torch.zeros(k).index_add_(0, index, hit.float().cpu()).tolist()
            return [h / c if c else math.nan for h, c in zip(hits, count)]

        return {"sat_acc": rate(guess == target), "sat_agree": rate(guess == teacher.argmax(-1)), "sat_count": count}


def _mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a 1-D tensor; 0 (still part of the graph) when it is empty."""
    return values.sum() / max(values.numel(), 1)
