"""A running batch of sequences that share draft/verify (or plain) steps.

Sequences join (their prompts are prefilled and appended) and leave (finished or
cancelled) between steps; every step uses one k for the whole batch and each row accepts
its own number of drafts. Used by :func:`sdsat.decode.generate.generate` and by the serving engine.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .decoding import plain_step, prefill, sdsat_step
from .fused import fused_step
from .gate import LOOKUP, SatGate
from .kv_cache import SlotCache
from .lookup import LookupIndex
from .stats import DecodeStats
from .tree import DraftTree, sdsat_tree_step, with_first_candidates

_ids = itertools.count()


@dataclass
class Sequence:
    """One request's prompt, output and stopping rules."""

    prompt_ids: list[int]
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    num_sat: int | None = None  # cap on k for this sequence (None: the batch's k)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "cancelled", "error"
    stop_text_at: int | None = None  # where the matched stop string starts in the decoded text
    stats: DecodeStats = field(default_factory=DecodeStats)
    seq_id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def text(self, tokenizer) -> str:
        """The decoded output, cut before a matched stop string."""
        text = tokenizer.decode(self.output_ids, skip_special_tokens=True)
        return text if self.stop_text_at is None else text[: self.stop_text_at]

    def append(self, tokens: list[int], tokenizer=None) -> list[int]:
        """Add newly generated tokens, applying EOS, stop strings and max_new_tokens.

        Returns the tokens actually kept (a prefix of ``tokens``).
        """
        room = self.max_new_tokens - len(self.output_ids)
        kept = tokens[:room]
        for i, token in enumerate(kept):
            if token in self.eos_token_ids:
                kept = kept[: i + 1]
                self.finish_reason = "stop"
                break
        before = len(self.output_ids)
        self.output_ids.extend(kept)
        if self.stop and tokenizer is not None:
            self._check_stop(before, tokenizer)
        if self.finish_reason is None and len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.output_ids[before:]

    def _check_stop(self, before: int, tokenizer) -> None:
        text = tokenizer.decode(self.output_ids, skip_special_tokens=True)
        hits = [(i, i + len(s)) for i, s in ((text.find(s), s) for s in self.stop) if i >= 0]
        if not hits:
            return
        at, end = min(hits)
        # Keep the fewest tokens whose text holds the whole stop string.
        for n in range(before, len(self.output_ids) + 1):
            if len(tokenizer.decode(self.output_ids[:n], skip_special_tokens=True)) >= end:
                del self.output_ids[n:]
                break
        self.stop_text_at = at
        self.finish_reason = "stop"


@dataclass
class StepEvent:
    sequence: Sequence
    new_ids: list[int]  # tokens appended by this step (may be empty)


class Batch:
    """Sequences decoding together on one model."""

    def __init__(self, model, tokenizer=None, banned_ids: list[int] = (), pad_id: int = 0, gate: SatGate | None = None):
        self.model = model
        self.gate = gate  # fused mode: decides, where the SAT draft block would run, whether it does
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.banned = torch.tensor(sorted(set(banned_ids)), dtype=torch.long, device=self.device)
        self.pad_id = pad_id
        self.sequences: list[Sequence] = []
        self.cache = SlotCache.for_model(model, 0)
        self.last = torch.empty(0, dtype=torch.long, device=self.device)  # [B]
        self.pending: torch.Tensor | None = None  # [B, k]: fused mode's SAT drafts for the next step
        # The token that stands in for missing drafts (verification keeps the output exact either
        # way): a SAT id, never accepted, where the model has SATs.
        self.pending_filler = int(self.banned[0]) if self.banned.numel() else pad_id
        self.lookups: dict[int, LookupIndex] = {}  # seq_id -> its prompt-lookup index (fused mode)

    def __len__(self) -> int:
        return len(self.sequences)

    @torch.inference_mode()
    def add(self, sequences: list[Sequence]) -> None:
        """Prefill new sequences and let them join the batch."""
        if not sequences:
            return
        cache = SlotCache.for_model(self.model, len(sequences))
        start = time.perf_counter()
        last = prefill(self.model, cache, [s.prompt_ids for s in sequences], self.pad_id)
        elapsed = time.perf_counter() - start
        for seq in sequences:
            seq.stats.prefill_s += elapsed
        self.cache.extend(cache)
        self.last = torch.cat([self.last, last])
        self.sequences.extend(sequences)
        self.pending = None if self.pending is None else self._pad_rows(self.pending, len(sequences))

    @torch.inference_mode()
    def step(
        self,
        sat_ids: list[int],
        draft_override: Callable[[list[Sequence], torch.Tensor], torch.Tensor] | None = None,
        tree: DraftTree | None = None,
        fused: bool = False,
        lookup: int = 0,
        lookup_first: bool = False,
    ) -> list[StepEvent]:
        """One iteration for every row: draft-then-verify with these SATs, or plain if none.

        tree: verify a draft tree (depth len(sat_ids)) instead of the chain of top-1 drafts;
        draft_override then replaces the top-1 candidate of every depth.
        fused: one pass verifies the pending drafts and drafts the next ones (sdsat/decode/fused.py),
        with up to ``lookup`` prompt-lookup drafts verified beside them; lookup_first: when every
        row has lookup drafts, run no SAT draft block in that pass (so SAT drafts are made only
        where lookup finds none).
        Finished sequences leave the batch after the step.
        """
        if not self.sequences:
            return []
        start = time.perf_counter()
        forward_before = self.cache.forward_seconds
        k = len(sat_ids)
        fused = fused and (k > 0 or lookup > 0)
        arm, sat_gain = None, 0  # the gate's choice in this pass, if it made one; SAT drafts' gain
        if not (fused and k):
            self.pending = None  # drafts made for the old position would be off
        if k == 0 and not fused:
            emitted = self._plain()
            passes = 1
        else:
            override = None
            if draft_override is not None:
                override = lambda drafts: draft_override(self.sequences, drafts)  # noqa: E731
            sat = torch.tensor(sat_ids, dtype=torch.long, device=self.device)
            if fused:
                if draft_override is not None or tree is not None:
                    raise ValueError("fused decoding takes no draft override or tree")
                emitted, accepted, offered, arm, sat_gain = self._fused(sat, lookup, lookup_first)
            elif tree is None:
                emitted, self.last, _ = sdsat_step(self.model, self.cache, self.last, sat, self.banned, override)
            else:
                first = None
                if override is not None:
                    first = lambda cands: with_first_candidates(cands, override(cands[:, :, 0]))  # noqa: E731
                emitted, self.last, _ = sdsat_tree_step(
                    self.model, self.cache, self.last, sat, self.banned, tree, first
                )
            passes = 1 if fused else 2
        forward_s = self.cache.forward_seconds - forward_before
        wall_s = time.perf_counter() - start
        if self.gate is not None:
            self.gate.after_pass(arm, sum(len(tokens) for tokens in emitted), wall_s, sat_gain)
        events = []
        for row, (seq, tokens) in enumerate(zip(self.sequences, emitted)):
            stats = seq.stats
            stats.iterations += 1
            stats.forward_passes += passes
            stats.forward_s += forward_s
            stats.decode_s += wall_s
            if fused:
                if offered:
                    stats.record_drafts(offered, accepted[row])
            elif k:
                stats.record_drafts(k, len(tokens) - 2)
            kept = seq.append(tokens, self.tokenizer)
            stats.new_tokens += len(kept)
            events.append(StepEvent(seq, kept))
        self._drop(lambda s: s.finished)
        if self.gate is not None and not self.sequences:
            self.gate.reset_pending()  # no next pass to score a decision with
        return events

    def cancel(self, seq_ids: set[int], reason: str = "cancelled") -> list[Sequence]:
        """Remove these sequences from the batch; returns the removed ones."""
        removed = [s for s in self.sequences if s.seq_id in seq_ids]
        for seq in removed:
            seq.finish_reason = seq.finish_reason or reason
        self._drop(lambda s: s.seq_id in seq_ids)
        return removed

    def _drop(self, gone: Callable[[Sequence], bool]) -> None:
        keep = [i for i, s in enumerate(self.sequences) if not gone(s)]
        if len(keep) == len(self.sequences):
            return
        self.cache.select_rows(keep)
        self.last = self.last[keep]
        self.sequences = [self.sequences[i] for i in keep]
        kept = {s.seq_id for s in self.sequences}
        self.lookups = {i: index for i, index in self.lookups.items() if i in kept}
        if self.pending is not None:
            self.pending = self.pending[keep]

    def _pad_rows(self, pending: torch.Tensor, rows: int) -> torch.Tensor:
        """New rows have no SAT drafts yet: a SAT id, never accepted, stands in."""
        pad = torch.full((rows, pending.shape[1]), self.pending_filler, dtype=torch.long, device=self.device)
        return torch.cat([pending, pad])

    def _fused(self, sat: torch.Tensor, lookup: int, lookup_first: bool) -> tuple[list[list[int]], list[int], int, str | None, int]:
        """One fused iteration (sdsat/decode/fused.py); returns (emitted tokens, accepted drafts) per row,
        the deepest draft offered, the gate's choice (None: it made none) and the SAT drafts'
        gain: tokens accepted beyond what the lookup drafts alone would have given."""
        rows = len(self.sequences)
        # Drafts past a row's max_new_tokens would be cut anyway (and this keeps them in its
        # context): a trie of b nodes is at most b deep.
        tries = [self._lookup(s, min(lookup, s.max_new_tokens - len(s.output_ids) - 1)) for s in self.sequences] if lookup else []
        m = max((len(tokens) for tokens, _ in tries), default=0)
        arm = None
        if lookup_first and m and all(tokens for tokens, _ in tries):  # every row has lookup drafts: no draft block
            sat = sat[:0]
        elif self.gate is not None and sat.numel():
            arm = self.gate.choose()
            if arm == LOOKUP:
                sat = sat[:0]
        pending = self._pending_chain(rows)
        c = pending.shape[1]
        if c + m + sat.numel() == 0:  # no drafts of any kind: a plain step
            return self._plain(), [0] * rows, 0, arm, 0
        table = torch.full((rows, m), self.pending_filler, dtype=torch.long, device=self.device)
        parents = [[-1] * m for _ in range(rows)]  # a row's spare nodes: the filler, under the root
        deepest = 0
        for row, (tokens, up) in enumerate(tries):
            if tokens:
                table[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                parents[row][: len(up)] = up
                deepest = max(deepest, _depth(up))
        emitted, self.last, nxt, accepted = fused_step(
            self.model, self.cache, self.last, pending, table, sat, self.banned, self.pending_filler, parents if m else None
        )
        self.pending = nxt if nxt.shape[1] else None
        gain = 0
        if c:  # what lookup alone would have accepted: the trie's walk along the true tokens
            gain = sum(a - _walk(trie, row[:a]) if trie else a for a, row, trie in zip(accepted, emitted, tries or [None] * rows))
        return emitted, accepted, max(c, deepest), arm, gain

    def _plain(self) -> list[list[int]]:
        """One plain greedy step for every row; returns the token each row emitted."""
        self.last = plain_step(self.model, self.cache, self.last, self.banned)
        return [[t] for t in self.last.tolist()]

    def _lookup(self, seq: Sequence, budget: int) -> tuple[list[int], list[int]]:
        """This row's prompt-lookup trie of up to ``budget`` nodes, (tokens, parents) (an index
        per row, kept up to date)."""
        index = self.lookups.get(seq.seq_id)
        if index is None:
            index = self.lookups[seq.seq_id] = LookupIndex(seq.prompt_ids)
        index.extend(seq.output_ids[len(index.tokens) - len(seq.prompt_ids) :])
        return index.tree(budget)

    def _pending_chain(self, rows: int) -> torch.Tensor:
        """The SAT drafts to verify [rows, c]: trailing columns that hold no row's draft are cut."""
        if self.pending is None or self.pending.shape[0] != rows:
            return torch.empty(rows, 0, dtype=torch.long, device=self.device)
        real = (self.pending != self.pending_filler).any(dim=0).nonzero()
        return self.pending[:, : int(real[-1]) + 1] if real.numel() else self.pending[:, :0]


def _depth(parents: list[int]) -> int:
    """The depth of the deepest node of a trie given as parents (-1: under the root)."""
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return max(depths, default=0)


def _walk(trie: tuple[list[int], list[int]], truth: list[int]) -> int:
    """How many of ``truth``'s leading tokens form a path from the root of the trie (tokens, parents)."""
    tokens, parents = trie
    node = -1
    for depth, token in enumerate(truth):
        node = next((i for i, (t, p) in enumerate(zip(tokens, parents)) if p == node and t == token), None)
        if node is None:
            return depth
    return len(truth)
