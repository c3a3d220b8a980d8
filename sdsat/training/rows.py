"""Training rows: a standard sequence followed by SAT blocks that never touch standard tokens.

docs/design.md, "Training". A row is x_0..x_{L-1} followed by n SAT blocks,
n ~ Poisson(lambda) clipped to [1, max_blocks], each for an anchor t uniform in [0, L-2]:
- block token i (1-based) has position id t+i, attends to standard tokens 0..t and to
  block tokens 1..i, and its label is x_{t+i+1} (ignored past the end);
- standard token p attends to standard tokens 0..p only and its label is x_{p+1}.
So a standard token's logits equal those of a plain forward of x.

Per token, a row stores ``block_id`` (-1 for standard tokens, b for block b) and
``sat_offset`` (0 for standard tokens, i for SAT i). The anchor of any token is
``position_ids - sat_offset``, which is all :func:`collate` needs to build the mask.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE = -100  # label of positions without a target
STD_BLOCK = -1  # block_id of standard tokens
PAD_BLOCK = -2  # block_id of padding


@dataclass
class RowConfig:
    num_sat: int  # k: SATs per block (the longest block)
    poisson_lambda: float = 12.0  # mean number of SAT blocks per row
    max_blocks: int = 64  # blocks per row are clipped to [1, max_blocks]
    variable_length: bool = False  # False: every block has k SATs; True: length uniform in 1..k
    seed: int = 0  # for the caller's random.Random that build_row draws from

    def __post_init__(self):
        if self.num_sat < 1:
            raise ValueError(f"num_sat must be >= 1, got {self.num_sat}")
        if self.poisson_lambda <= 0:
            raise ValueError(f"poisson_lambda must be > 0, got {self.poisson_lambda}")
        if self.max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {self.max_blocks}")


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson(lam) sample: the number of unit-rate arrivals before time lam."""
    count, elapsed = 0, rng.expovariate(1.0)
    while elapsed <= lam:
        count += 1
        elapsed += rng.expovariate(1.0)
    return count


def build_row(tokens: list[int], sat_ids: list[int], cfg: RowConfig, rng: random.Random) -> dict:
    """One augmented row (lists of equal length): input_ids, position_ids, labels,
    sat_offset, block_id. ``sat_ids`` holds the k ids of a block (repeated or distinct)."""
    length = len(tokens)
    if length < 2:
        raise ValueError(f"a training row needs at least 2 standard tokens, got {length}")
    if len(sat_ids) < cfg.num_sat:
        raise ValueError(f"need {cfg.num_sat} SAT ids for num_sat={cfg.num_sat}, got {len(sat_ids)}")
    n_blocks = min(max(poisson(rng, cfg.poisson_lambda), 1), cfg.max_blocks)
    anchors = sorted(rng.randint(0, length - 2) for _ in range(n_blocks))

    input_ids = list(tokens)
    position_ids = list(range(length))
    labels = list(tokens[1:]) + [IGNORE]
    sat_offset = [0] * length
    block_id = [STD_BLOCK] * length
    for block, t in enumerate(anchors):
        m = rng.randint(1, cfg.num_sat) if cfg.variable_length else cfg.num_sat
        for i in range(1, m + 1):
            input_ids.append(sat_ids[i - 1])
            position_ids.append(t + i)
            labels.append(tokens[t + i + 1] if t + i + 1 < length else IGNORE)
            sat_offset.append(i)
            block_id.append(block)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "sat_offset": sat_offset,
        "block_id": block_id,
    }


def collate(rows: list[dict], pad_id: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch and build its additive float attention mask.

    Returns input_ids, position_ids, labels, sat_offset [B, T] and attention_mask
    [B, 1, T, T] (0 where a query may attend, finfo(dtype).min elsewhere).
    Pad tokens: label -100, invisible to every other token; each pad query sees only
    itself, so its attention row stays finite.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    width = max(len(r["input_ids"]) for r in rows)

    def padded(key: str, fill: int) -> torch.Tensor:
        out = torch.full((len(rows), width), fill, dtype=torch.long)  # [B, T]
        for b, row in enumerate(rows):
            out[b, : len(row[key])] = torch.tensor(row[key], dtype=torch.long)
        return out

    batch = {
        "input_ids": padded("input_ids", pad_id),
        "position_ids": padded("position_ids", 0),
        "labels": padded("labels", IGNORE),
        "sat_offset": padded("sat_offset", 0),
    }
    block_id = padded("block_id", PAD_BLOCK)  # [B, T]
    batch["attention_mask"] = attention_mask(batch["position_ids"], batch["sat_offset"], block_id, dtype)
    return batch


def attention_mask(
    position_ids: torch.Tensor, sat_offset: torch.Tensor, block_id: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [B, 1, T, T] from per-token tensors [B, T] (see :func:`allowed`), on their device."""
    allowed_ = allowed(position_ids, sat_offset, block_id)  # [B, T, T]
    mask = torch.zeros(allowed_.shape, dtype=dtype, device=allowed_.device)
    mask.masked_fill_(~allowed_, torch.finfo(dtype).min)
    return mask[:, None]


def allowed(position_ids: torch.Tensor, sat_offset: torch.Tensor, block_id: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool: may query q (dim 1) attend to key j (dim 2)?

    - key j standard and at index <= the query's anchor (a standard query's anchor is its own
      index: causal attention among standard tokens; a SAT's anchor is t);
    - or key j in the query's own SAT block with offset <= the query's offset;
    - or j == q (only matters for pad queries, which otherwise see nothing).
    """
    anchor = position_ids - sat_offset  # [B, T]; standard tokens: their own index
    valid = block_id != PAD_BLOCK  # [B, T]
    key_std = (block_id == STD_BLOCK)[:, None, :]  # [B, 1, T]
    # Standard tokens sit at the front of a row in order, so their index is their position.
    sees_std = key_std & (position_ids[:, None, :] <= anchor[:, :, None])  # [B, T, T]
    same_block = (block_id[:, :, None] == block_id[:, None, :]) & (block_id >= 0)[:, None, :]
    sees_block = same_block & (sat_offset[:, None, :] <= sat_offset[:, :, None])  # [B, T, T]
    rule = (sees_std | sees_block) & valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(block_id.shape[1], dtype=torch.bool, device=block_id.device)[None]  # [1, T, T]
    return rule | eye
