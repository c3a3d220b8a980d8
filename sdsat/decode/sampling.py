"""Plain sampling (temperature, top-p, per-request seeds) for a batch of sequences.

Speculative sampling (DESIGN.md, "Sampling") replaces this later; until then a request
with temperature > 0 decodes one sampled token per pass. Each row has its own
``torch.Generator``, so a seed reproduces a request's output whatever else is batched.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from .batch import Batch, Sequence, StepEvent
from .decoding import forward
from .logprobs import LogprobTap


@dataclass
class SamplingParams:
    temperature: float  # > 0
    top_p: float = 1.0  # in (0, 1]
    seed: int | None = None  # None: a fresh random seed

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generator(self, device: torch.device) -> torch.Generator:
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
        return torch.Generator(device=device).manual_seed(seed)


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail of each row beyond its nucleus and renormalise. probs [B, V], top_p [B].

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p
    (it always holds the most likely token).
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]
    keep_sorted = mass_before < top_p[:, None]  # [B, V]
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator],
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row. logits [B, V], temperature [B], top_p [B] -> tokens [B]."""
    logits = logits.float()
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned, float("-inf"))
    probs = top_p_filter(torch.softmax(logits / temperature[:, None], dim=-1), top_p)  # [B, V]
    # One draw per row with that row's generator, so rows never share random state.
    tokens = [torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, generators)]
    return torch.cat(tokens)


class SamplingBatch(Batch):
    """A :class:`Batch` whose rows sample (one token per pass) instead of decoding greedily."""

    def __init__(self, model, tokenizer=None, banned_ids: list[int] = (), pad_id: int = 0):
        super().__init__(model, tokenizer, banned_ids, pad_id)
        self.params: dict[int, tuple[SamplingParams, torch.Generator]] = {}  # seq_id -> its sampler

    def add(self, sequences: list[Sequence], params: list[SamplingParams] | None = None) -> None:
        if params is None or len(params) != len(sequences):
            raise ValueError("SamplingBatch.add needs one SamplingParams per sequence")
        super().add(sequences)
        for seq, p in zip(sequences, params):
            self.params[seq.seq_id] = (p, p.generator(self.device))

    @torch.inference_mode()
    def step(self, sat_ids: list[int] = (), draft_override=None) -> list[StepEvent]:
        """One sampled token for every row (``sat_ids`` must be empty: no drafting yet)."""
        if sat_ids or draft_override is not None:
            raise ValueError("sampling does not draft yet: call step() without SATs")
        if not self.sequences:
            return []
        start = time.perf_counter()
        forward_before = self.cache.forward_seconds
        samplers = [self.params[s.seq_id] for s in self.sequences]
        temperature = torch.tensor([p.temperature for p, _ in samplers], device=self.device)  # [B]
        top_p = torch.tensor([p.top_p for p, _ in samplers], device=self.device)  # [B]
        logits = forward(self.model, self.cache, self.last[:, None])  # [B, 1, V]
        self.cache.advance(1)
        self.last = sample(logits[:, 0], temperature, top_p, [g for _, g in samplers], self.banned)  # [B]
        tap = LogprobTap.for_rows(self.sequences, self.banned)  # the model's own log-probabilities
        if tap is not None:
            tap(logits, [[0]] * len(self.sequences), self.last[:, None].tolist())
        forward_s = self.cache.forward_seconds - forward_before
        wall_s = time.perf_counter() - start
        events = []
        for row, (seq, token) in enumerate(zip(self.sequences, self.last.tolist())):
            stats = seq.stats
            stats.iterations += 1
            stats.forward_passes += 1
            stats.forward_s += forward_s
            stats.decode_s += wall_s
            kept = seq.append([token], self.tokenizer)
            if tap is not None:
                seq.token_logprobs += tap.take(row, len(kept))
            stats.new_tokens += len(kept)
            events.append(StepEvent(seq, kept))
        self._drop(lambda s: s.finished)
        self.params = {s.seq_id: self.params[s.seq_id] for s in self.sequences}
        return events

    def cancel(self, seq_ids: set[int], reason: str = "cancelled") -> list[Sequence]:
        removed = super().cancel(seq_ids, reason)
        for seq in removed:
            self.params.pop(seq.seq_id, None)
        return removed
