"""The target distribution: what plain sampling draws each token from.

Speculative sampling must reproduce exactly this distribution, so both paths call these
functions. Processing, in transformers' order:
1. presence and frequency penalties (OpenAI semantics) over the tokens generated so far:
   ``logits[t] -= presence * (count[t] > 0) + frequency * count[t]``;
2. banned ids (the SATs) removed;
3. temperature; temperature 0 is greedy: the argmax of the penalised logits;
4. top-k, then top-p on what top-k kept. Tokens tied with the last kept one are kept too,
   so the kept set depends on the probabilities only, never on a sort order.

A draw is the inverse CDF of the processed distribution at one uniform number, so one
uniform per output position decides the token there (:mod:`sdsat.decode.sample_accept`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

_FIRST_TOP = 64  # top-p looks at this many of the most likely tokens first, then 16x more


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy (the argmax of the penalised logits)
    top_p: float = 1.0  # in (0, 1]
    seed: int | None = None  # None: a fresh random seed
    top_k: int = 0  # keep the k most likely tokens (0: all)
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2 <= value <= 2):
                raise ValueError(f"{name} must be in [-2, 2], got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def generator(self) -> torch.Generator:
        """A CPU generator seeded from ``seed`` (or a fresh random seed): the same on every device."""
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
        return torch.Generator().manual_seed(seed % 2**64)


def penalize(
    logits: torch.Tensor,
    counts: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    path: torch.Tensor | None = None,
) -> torch.Tensor:
    """Presence and frequency penalties at N nodes per row; returns new logits.

    logits [B, N, V]; counts [B, V]: tokens generated before the root; presence, frequency [B];
    path [B, N, D]: the draft tokens on root..node after the root (-1 past the node's depth),
    which count as generated at that node.
    """
    seen = counts > 0  # [B, V]
    out = logits - (presence[:, None] * seen + frequency[:, None] * counts)[:, None, :]
    if path is None or not path.shape[2]:
        return out
    valid = path >= 0  # [B, N, D]
    index = path.clamp(min=0)
    d = path.shape[2]
    earlier = torch.ones(d, d, dtype=torch.bool, device=path.device).tril(-1)  # [D, D]: d' < d
    repeat = ((path[..., :, None] == path[..., None, :]) & earlier).any(dim=-1)  # [B, N, D]
    new = ~seen.gather(1, index.flatten(1)).view_as(index)  # not generated before the root
    amount = frequency[:, None, None] * valid + presence[:, None, None] * (valid & new & ~repeat)
    return out.scatter_add_(2, index, -amount.to(out.dtype))


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The processed distribution (steps 3-4) for rows that sample (temperature > 0).

    logits [R, ..., V] (penalised, banned ids at -inf), params [R] -> probabilities, same shape.
    """
    weights, top_k, top_p = _tempered(logits.float().clone(), params)
    if any(p.top_k or p.top_p < 1 for p in params):
        threshold = _top(weights, top_k, top_p)[0]
        weights = weights * (weights >= threshold[:, None])
    return (weights / weights.sum(dim=-1, keepdim=True)).view(logits.shape)


def draw(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """One draw from the processed distribution per row: the inverse CDF at u.

    logits [R, ..., V] float32, contiguous, as :func:`target_probs` takes them (overwritten);
    u [R, ...] in [0, 1) -> tokens [R, ...]. Where top-k or top-p applies, the CDF runs over
    the kept tokens, most likely first; elsewhere over the vocabulary in id order.
    """
    weights, top_k, top_p = _tempered(logits, params)
    device = weights.device
    u = u.reshape(-1).to(device)
    cut = [i for i, (k, p) in enumerate(zip(top_k, top_p)) if k or p < 1]  # rows top-k or top-p cut
    if len(cut) == len(u):
        tokens = _draw_kept(weights, top_k, top_p, u)
    elif not cut:
        tokens = inverse_cdf(weights, u)
    else:  # some of each: draw each part on its own
        tokens = torch.empty(len(u), dtype=torch.long, device=device)
        rows = torch.tensor(cut, device=device)
        tokens[rows] = _draw_kept(weights[rows], [top_k[i] for i in cut], [top_p[i] for i in cut], u[rows])
        rest = torch.tensor(sorted(set(range(len(u))) - set(cut)), device=device)
        tokens[rest] = inverse_cdf(weights[rest], u[rest])
    return tokens.view(logits.shape[:-1])


def _draw_kept(weights: torch.Tensor, top_k: list[int], top_p: list[float], u: torch.Tensor) -> torch.Tensor:
    """The inverse CDF over the tokens top-k and top-p keep, most likely first. weights [R, V], u [R]."""
    threshold, values, indices = _top(weights, top_k, top_p)
    kept = values * (values >= threshold[:, None])  # [R, W]: every kept token is among these
    return indices.gather(1, _search(kept, u)[0][:, None])[:, 0]


def _tempered(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, list[int], list[float]]:
    """exp((logits - max) / temperature) in place, as [R', V] (unnormalised probabilities),
    and top_k, top_p per flat row."""
    per_row = math.prod(logits.shape[1:-1])
    x = logits.view(-1, logits.shape[-1])
    temperature = torch.tensor([p.temperature for p in params], device=x.device, dtype=x.dtype)
    x.div_(temperature.repeat_interleave(per_row)[:, None])
    x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    top_k = [p.top_k for p in params for _ in range(per_row)]
    top_p = [p.top_p for p in params for _ in range(per_row)]
    return x, top_k, top_p


def _top(weights: torch.Tensor, top_k: list[int], top_p: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of unnormalised probabilities [R, V]: the smallest weight top-k and top-p keep
    [R] (0: all), and the W largest weights and their ids [R, W], W wide enough to hold every
    kept token."""
    rows, vocab = weights.shape
    device = weights.device
    k = torch.tensor([t or vocab for t in top_k], device=device).clamp(max=vocab)  # [R]
    p = torch.tensor(top_p, device=device)  # [R]
    filtered = (k < vocab) | (p < 1)
    total = weights.sum(dim=-1)  # [R]
    width = min(vocab, max(max(top_k) + 1, _FIRST_TOP if min(top_p) < 1 else 1))
    while True:
        values, indices = weights.topk(width, dim=-1)  # [R, W], most likely first
        thr_k = torch.where(k < vocab, values.gather(1, (k.clamp(max=width) - 1)[:, None])[:, 0], 0.0)
        inside = values >= thr_k[:, None]
        kept_k = torch.where(k < vocab, (values * inside).sum(dim=-1), total)  # top-k's mass
        mass_before = (values.cumsum(dim=-1) - values) / kept_k[:, None]
        count = (inside & (mass_before < p[:, None])).sum(dim=-1)  # nucleus size (>= 1)
        thr_p = values.gather(1, (count - 1)[:, None])[:, 0]
        threshold = torch.where(p < 1, thr_p, thr_k)
        # A kept set that reaches the W-th token may go on beyond it (or hold ties there).
        short = filtered & (values[:, -1] >= threshold)
        if width == vocab or not bool(short.any()):
            return threshold, values, indices
        width = min(vocab, width * 16)


_BLOCK = 256  # the inverse CDF finds the block of this many ids first, then the id inside it


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval (ids in order) holds u * total: probs [R, V] (need not
    sum to 1), u [R] in [0, 1). A token of probability 0 is never drawn."""
    rows, vocab = probs.shape
    if vocab % _BLOCK:
        probs = torch.nn.functional.pad(probs, (0, -vocab % _BLOCK))
    blocks = probs.view(rows, -1, _BLOCK)  # [R, nb, 256]
    block, rest = _search(blocks.sum(dim=-1), u)
    inner, _ = _search(blocks[torch.arange(rows, device=probs.device), block], rest, scaled=False)
    return block * _BLOCK + inner


def _search(weights: torch.Tensor, u: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The first index whose cumulative weight reaches t = u * total (scaled) or t = u, kept within
    (0, total] so that a weight-0 index is never chosen; and what of t is left past the ones before.
    weights [R, n] >= 0, u [R] -> (index [R], rest [R])."""
    weights = weights.double()
    cdf = weights.cumsum(dim=-1)  # [R, n]
    total = cdf[:, -1]
    t = u.double() * total if scaled else u.double()
    t = torch.minimum(t.clamp(min=torch.finfo(torch.float64).tiny), total)
    index = torch.searchsorted(cdf, t[:, None])[:, 0].clamp(max=weights.shape[1] - 1)
    rows = torch.arange(len(index), device=weights.device)
    return index, t - (cdf[rows, index] - weights[rows, index])
