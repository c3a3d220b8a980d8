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
from .rows import IGNORE, PAD_BLOCK, STD_BLOCK, attention_mask


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


def collate_two_pass(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of :func:`sdsat.training.rows.build_row` -> a two-pass batch of integer tensors.

    std_ids, std_pos, std_block [B, W]; sat_ids, sat_pos, sat_offset, sat_block, labels [B, S];
    teacher_index [N] (for each labelled SAT, in row-major order, the flat index b * W + t + i
    of its teacher position). The attention masks are not built here but by
    :func:`two_pass_masks` on the device the batch is moved to: a float mask is W + S times
    the size of the rest (18 MB for 16 rows of 64 blocks), and building it on the host cost
    more than the GPU's step.
    """
    if not rows:
        raise ValueError("collate_two_pass needs at least one row")
    split = [sum(1 for b in row["block_id"] if b == STD_BLOCK) for row in rows]
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
    sat_labels = labels[:, width:]
    labelled = sat_labels != IGNORE  # [B, S]
    row_of = torch.arange(batch_size)[:, None].expand_as(sat_labels)
    teacher_index = row_of[labelled] * width + pos[:, width:][labelled]
    return {
        "std_ids": ids[:, :width],
        "std_pos": pos[:, :width],
        "std_block": block[:, :width],
        "sat_ids": ids[:, width:],
        "sat_pos": pos[:, width:],
        "sat_offset": offset[:, width:],
        "sat_block": block[:, width:],
        "labels": sat_labels,
        "teacher_index": teacher_index,
    }


def two_pass_masks(batch: dict, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive masks (0 / finfo(dtype).min) of a :func:`collate_two_pass` batch, on its
    device: the standard pass's [B, 1, W, W] and the SAT pass's [B, 1, S, W + S]."""
    std_pos = batch["std_pos"]
    pos = torch.cat([std_pos, batch["sat_pos"]], dim=1)
    offset = torch.cat([torch.zeros_like(std_pos), batch["sat_offset"]], dim=1)
    block = torch.cat([batch["std_block"], batch["sat_block"]], dim=1)
    mask = attention_mask(pos, offset, block, dtype)  # [B, 1, W + S, W + S]
    width = std_pos.shape[1]
    return mask[:, :, :width, :width], mask[:, :, width:, :]


def frozen_loss(model, batch: dict, cfg: FrozenLossConfig) -> tuple[torch.Tensor, dict]:
    """Loss and metrics. Metrics as :func:`sdsat.training.loss.sdsat_loss` returns them (ce_std is 0):
    sat_acc per offset is the agreement with the teacher (the acceptance estimate on this
    prefix), sat_data_acc the accuracy against the data."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    banned = torch.tensor(sorted(set(cfg.banned_ids)), dtype=torch.long, device=batch["std_ids"].device)
    std_mask, sat_mask = two_pass_masks(batch)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        std_hidden = decoder(
            input_ids=batch["std_ids"], position_ids=batch["std_pos"], attention_mask=std_mask,
            cache=cache, use_cache=True,
        ).last_hidden_state  # [B, W, H]
        teacher = _logits(head, std_hidden.reshape(-1, std_hidden.shape[-1])[batch["teacher_index"]], banned)  # [N, V]
    labelled = batch["labels"] != IGNORE  # [B, S]
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.sat_grad):
        sat_hidden = decoder(
            input_ids=batch["sat_ids"], position_ids=batch["sat_pos"], attention_mask=sat_mask,
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
