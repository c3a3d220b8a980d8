"""The SDSAT loss for a frozen base model: standard tokens without gradients, then SAT blocks.

With the base frozen (only a SAT adapter and the SAT embedding rows train), standard
tokens need no autograd at all, and they never attend to SATs. So a batch runs in two
passes over the same rows (layout of :func:`sdsat.training.rows.build_row`):
1. the standard tokens under ``torch.no_grad``, filling a KV cache; the base model's own
   prediction at standard position t+i (given the real prefix) is the *teacher* of SAT i
   of anchor t: verification accepts exactly that token on this prefix;
2. the SAT blocks on top of that cache, with gradients; the LM head runs only at
   labelled SAT positions.
Most compute then goes to SAT labels (rows can hold many blocks).

Loss = w_teacher * CE(SAT, teacher argmax) + w_kl * KL(teacher || SAT) + w_sat * CE(SAT, data)
[+ w_head * CE(head, teacher argmax)]. On the model's own greedy continuations
(self-distillation rows) teacher and data agree.

With a draft head (:mod:`sdsat.model.draft_head`), SAT i of anchor t is also read out by the
head conditioned on x_{t+i}, the standard token at the teacher's position (in decoding that
token is the one verification just emitted, or the head's previous guess), and on the
anchor's hidden state (in decoding: the root's). The
metrics then report the head's accuracy, since its guesses are the drafts decoding proposes.
With ``sat_grad`` False (the adapter frozen, only the head trains) the SAT pass runs without
gradients too, and only the head's few products are differentiated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..model.draft_head import get_head
from .loss import _kl, _logits, _mean
from .rows import IGNORE, PAD_BLOCK, STD_BLOCK, allowed


@dataclass
class FrozenLossConfig:
    banned_ids: tuple[int, ...]  # ids never predicted (the model's SAT ids)
    num_sat: int  # k: length of the per-offset metrics
    w_teacher: float = 1.0  # CE against the base model's argmax at t+i
    w_kl: float = 0.0  # KL(base distribution at t+i || SAT i's)
    w_sat: float = 0.0  # CE against the data's token x_{t+i+1}
    w_head: float = 0.0  # CE of the draft head's guess against the teacher argmax (needs a head)
    sat_grad: bool = True  # False: the SAT pass runs without gradients (only a draft head trains)

    def __post_init__(self):
        weights = (self.w_teacher, self.w_kl, self.w_sat, self.w_head)
        if min(weights) < 0 or sum(weights) == 0:
            raise ValueError(f"loss weights must be >= 0 and not all 0, got {weights}")


def collate_two_pass(rows: list[dict], pad_id: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rows of :func:`sdsat.training.rows.build_row` -> a two-pass batch.

    std_ids, std_pos [B, W]; std_mask [B, 1, W, W]; sat_ids, sat_pos, sat_offset, labels [B, S];
    sat_mask [B, 1, S, W + S] (additive, 0 / finfo(dtype).min); teacher_index [N] (for each
    labelled SAT, in row-major order, the flat index b * W + t + i of its teacher position).
    """
    if not rows:
        raise ValueError("collate_two_pass needs at least one row")
    split = []
    for row in rows:
        n = sum(1 for b in row["block_id"] if b == STD_BLOCK)
        split.append(n)
    width, sats = max(split), max(len(r["input_ids"]) - n for r, n in zip(rows, split))
    batch_size, total = len(rows), width + max(sats, 1)

    def layout(key: str, fill: int) -> torch.Tensor:
        out = torch.full((batch_size, total), fill, dtype=torch.long)  # [B, W + S]
        for b, (row, n) in enumerate(zip(rows, split)):
            values = torch.tensor(row[key], dtype=torch.long)
            out[b, :n] = values[:n]
            out[b, width : width + len(values) - n] = values[n:]
        return out

    ids, pos = layout("input_ids", pad_id), layout("position_ids", 0)
    labels, offset, block = layout("labels", IGNORE), layout("sat_offset", 0), layout("block_id", PAD_BLOCK)
    ok = allowed(pos, offset, block)  # [B, W + S, W + S]
    mask = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, torch.finfo(dtype).min)[:, None]
    sat_labels = labels[:, width:]
    labelled = sat_labels != IGNORE  # [B, S]
    row_of = torch.arange(batch_size)[:, None].expand_as(sat_labels)
    teacher_index = row_of[labelled] * width + pos[:, width:][labelled]
    return {
        "std_ids": ids[:, :width],
        "std_pos": pos[:, :width],
        "std_mask": mask[:, :, :width, :width].contiguous(),
        "sat_ids": ids[:, width:],
        "sat_pos": pos[:, width:],
        "sat_offset": offset[:, width:],
        "labels": sat_labels,
        "sat_mask": mask[:, :, width:, :].contiguous(),
        "teacher_index": teacher_index,
    }


def frozen_loss(model, batch: dict, cfg: FrozenLossConfig) -> tuple[torch.Tensor, dict]:
    """Loss and metrics. Metrics as :func:`sdsat.training.loss.sdsat_loss` returns them (ce_std is 0):
    sat_acc per offset is the agreement with the teacher (the acceptance estimate on this
    prefix), sat_data_acc the accuracy against the data."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    banned = torch.tensor(sorted(set(cfg.banned_ids)), dtype=torch.long, device=batch["std_ids"].device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        std_hidden = decoder(
            input_ids=batch["std_ids"], position_ids=batch["std_pos"], attention_mask=batch["std_mask"],
            cache=cache, use_cache=True,
        ).last_hidden_state  # [B, W, H]
        teacher = _logits(head, std_hidden.reshape(-1, std_hidden.shape[-1])[batch["teacher_index"]], banned)  # [N, V]
    labelled = batch["labels"] != IGNORE  # [B, S]
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.sat_grad):
        sat_hidden = decoder(
            input_ids=batch["sat_ids"], position_ids=batch["sat_pos"], attention_mask=batch["sat_mask"],
            cache=cache, use_cache=True,
        ).last_hidden_state[labelled]  # [N, H]
        logits = _logits(head, sat_hidden, banned)  # [N, V]
    target = teacher.argmax(-1)  # [N]
    data = batch["labels"][labelled]  # [N]

    zero = torch.zeros((), device=logits.device)
    ce_teacher = _mean(F.cross_entropy(logits, target, reduction="none")) if cfg.w_teacher else zero
    kl = _mean(_kl(teacher, logits)) if cfg.w_kl else zero
    ce_data = _mean(F.cross_entropy(logits, data, reduction="none")) if cfg.w_sat else zero
    loss = cfg.w_teacher * ce_teacher + cfg.w_kl * kl + cfg.w_sat * ce_data
    draft_head = get_head(model)
    if cfg.w_head and draft_head is None:
        raise ValueError("w_head > 0 needs a model with a draft head")
    if draft_head is not None:  # its guess, conditioned on x_{t+i}, is what decoding drafts
        prev = batch["std_ids"].reshape(-1)[batch["teacher_index"]]  # [N]: x_{t+i}
        anchor_index = batch["teacher_index"] - batch["sat_offset"][labelled]  # [N]: b * W + t
        anchor = std_hidden.reshape(-1, std_hidden.shape[-1])[anchor_index]  # [N, H]
        logits = draft_head.logits(sat_hidden, prev, anchor).float().index_fill(-1, banned, torch.finfo(torch.float32).min)
        ce_head = _mean(F.cross_entropy(logits, target, reduction="none"))
        loss = loss + cfg.w_head * ce_head
        ce_teacher = ce_head
    metrics = {
        "loss": float(loss.detach()),
        "ce_std": 0.0,
        "ce_sat": float(ce_teacher.detach()),
        "kl_sat": float(kl.detach()),
        **_per_offset(logits, target, data, batch["sat_offset"][labelled], cfg.num_sat),
        "n_std": 0,
        "n_sat": int(labelled.sum()),
    }
    return loss, metrics


def _per_offset(logits, target, data, offset, k: int) -> dict:
    with torch.no_grad():
        guess = logits.argmax(-1)
        index = (offset - 1).cpu()
        count = torch.bincount(index, minlength=k)[:k].tolist()

        def rate(hit: torch.Tensor) -> list[float]:
            hits = torch.zeros(k).index_add_(0, index, hit.float().cpu()).tolist()
            return [h / c if c else math.nan for h, c in zip(hits, count)]

        return {"sat_acc": rate(guess == target), "sat_data_acc": rate(guess == data), "sat_count": count}
