"""A running batch of sequences that share draft/verify (or plain) steps.

Sequences join (their prompts are prefilled and appended) and leave (finished or
cancelled) between steps; each row verifies its own drafts and accepts its own number.
Greedy and sampling rows share the batch and its passes: a sampling row verifies the same
drafts with speculative sampling's rule (:mod:`sdsat.decode.sample_accept`), so its output
is distributed exactly as plain sampling's. Used by :func:`sdsat.decode.generate.generate`
and by the serving engine.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .acceptance import depths
from .decoding import forward, plain_step, prefill, sdsat_step
from .draft_counts import DraftCounts, fused_counts, sat_counts
from .fused import RowNodes, fused_pass
from .kv_cache import SlotCache
from .logprobs import LogprobTap, TokenLogprob, prompt_tap
from .lookup import LookupIndex
from .sample_accept import RowSampler, sample_nodes
from .scheduler import Plan, RowCandidates, RowPlan, Scheduler, Trie
from .stats import DecodeStats
from .target import SamplingParams
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
    logprobs: int | None = None  # N: record each output token's log-probability and top N (None: don't)
    prompt_logprobs: int | None = None  # N: the same for the prompt's tokens, at prefill
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token
    prompt_token_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (first: None)
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
        # A new stop string ends in the new tokens and spans at most its length in characters
        # before them: decode only that tail (a character is at most 4 byte tokens), and the
        # whole output just once, when the tail holds one.
        tail = self.output_ids[max(0, before - 4 * max(map(len, self.stop)) - 4) :]
        if not any(s in tokenizer.decode(tail, skip_special_tokens=True) for s in self.stop):
            return
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
    """Sequences decoding together on one model.

    :meth:`step` runs a plain step or the paper's two-step iteration with a fixed k;
    :meth:`scheduled_step` runs the fused iteration with the drafts a
    :class:`sdsat.decode.scheduler.Scheduler` chooses per row (the default decoder).
    """

    def __init__(
        self, model, tokenizer=None, banned_ids: list[int] = (), pad_id: int = 0, scheduler: Scheduler | None = None,
        closed: bool = False,
    ):
        self.model = model
        # closed: no row will join (generate, the bench); the batch is done when its slowest
        # row is, which the scheduler weighs (scheduler.py, "Closed batches")
        self.closed = closed
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.device = next(model.parameters()).device
        self.banned = torch.tensor(sorted(set(banned_ids)), dtype=torch.long, device=self.device)
        self.pad_id = pad_id
        self.sequences: list[Sequence] = []
        self.cache = SlotCache.for_model(model, 0)
        self.last = torch.empty(0, dtype=torch.long, device=self.device)  # [B]
        self.pending: dict[int, list[int]] = {}  # seq_id -> SAT drafts made by the last draft block
        self.alternatives: dict[int, list[int]] = {}  # seq_id -> the draft head's other guesses for pending[0]
        # The token that pads a row's nodes to the pass's width (never accepted): a standard
        # token, so that padding does not switch on the SAT adapter.
        self.filler = pad_id
        self.lookups: dict[int, LookupIndex] = {}  # seq_id -> its prompt-lookup index
        self.samplers: dict[int, RowSampler] = {}  # seq_id -> its sampler; rows without one are greedy
        self.last_plan: Plan | None = None  # the latest scheduled step's plan
        self.counts = DraftCounts()  # the latest step's drafts verified and accepted (serving metrics)

    def __len__(self) -> int:
        return len(self.sequences)

    @torch.inference_mode()
    def add(self, sequences: list[Sequence], sampling: list[SamplingParams | None] | None = None) -> None:
        """Prefill new sequences and let them join the batch; sampling: each one's
        :class:`SamplingParams` (None, or temperature 0 without penalties: greedy)."""
        if not sequences:
            return
        if sampling is not None and len(sampling) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences need as many sampling params, got {len(sampling)}")
        cache = SlotCache.for_model(self.model, len(sequences))
        start = time.perf_counter()
        on_hidden = prompt_tap(self.model, sequences, self.banned)  # None unless a row asked for prompt logprobs
        last = prefill(self.model, cache, [s.prompt_ids for s in sequences], self.pad_id, on_hidden)
        elapsed = time.perf_counter() - start
        for seq in sequences:
            seq.stats.prefill_s += elapsed
        self.cache.extend(cache)
        self.last = torch.cat([self.last, last])
        self.sequences.extend(sequences)
        for seq, params in zip(sequences, sampling or []):
            if params is not None and not (params.greedy and not params.penalised):
                self.samplers[seq.seq_id] = RowSampler(params)

    @torch.inference_mode()
    def step(
        self,
        sat_ids: list[int] = (),
        draft_override: Callable[[list[Sequence], torch.Tensor], torch.Tensor] | None = None,
        tree: DraftTree | None = None,
    ) -> list[StepEvent]:
        """One iteration for every row: the paper's draft-then-verify with these SATs, or a
        plain step if none. tree: verify a draft tree (depth len(sat_ids)) instead of the chain
        of top-1 drafts; draft_override then replaces the top-1 candidate of every depth.
        Finished sequences leave the batch after the step."""
        if not self.sequences:
            return []
        start = time.perf_counter()
        forward_before = self.cache.forward_seconds
        k = len(sat_ids)
        self.pending, self.alternatives = {}, {}
        self.counts = DraftCounts()
        tap = LogprobTap.for_rows(self.sequences, self.banned)  # None unless a row asked for logprobs
        if k == 0:
            emitted = self._plain(tap)
        elif self.samplers:
            raise ValueError("sampling rows verify drafts in scheduled (fused) steps only: call step() without SATs")
        else:
            override = None
            if draft_override is not None:
                override = lambda drafts: draft_override(self.sequences, drafts)  # noqa: E731
            sat = torch.tensor(sat_ids, dtype=torch.long, device=self.device)
            if tree is None:
                emitted, self.last, _ = sdsat_step(self.model, self.cache, self.last, sat, self.banned, override, tap)
                self.counts = sat_counts([1] * k, [len(tokens) - 2 for tokens in emitted])
            else:
                if tap is not None:
                    raise ValueError("log-probabilities are not recorded by tree steps")
                first = None
                if override is not None:
                    first = lambda cands: with_first_candidates(cands, override(cands[:, :, 0]))  # noqa: E731
                emitted, self.last, _ = sdsat_tree_step(self.model, self.cache, self.last, sat, self.banned, tree, first)
                per_depth = [tree.depths.count(d) for d in range(1, tree.depth + 1)]
                self.counts = sat_counts(per_depth, [len(tokens) - 2 for tokens in emitted])
        nodes = k if tree is None else tree.size - 1  # drafts verified per row
        drafts = [(k, len(tokens) - 2, nodes) if k else None for tokens in emitted]
        return self._finish(emitted, drafts, 2 if k else 1, start, forward_before, tap)

    @torch.inference_mode()
    def scheduled_step(self, sat_ids: list[int], lookup: int) -> list[StepEvent]:
        """One fused iteration with the drafts the scheduler chooses: per row up to ``lookup``
        prompt-lookup nodes, its pending SAT drafts and a draft block of up to its num_sat
        (capped by len(sat_ids)) SATs; or a plain step where drafting does not pay."""
        if not self.sequences:
            return []
        if self.scheduler is None:
            raise ValueError("scheduled_step needs a Batch built with a scheduler")
        start = time.perf_counter()
        forward_before = self.cache.forward_seconds
        seq_ids = [s.seq_id for s in self.sequences]
        self.counts = DraftCounts()
        tap = LogprobTap.for_rows(self.sequences, self.banned)
        if self.scheduler.skipping(seq_ids):  # drafting does not pay here: plain, unplanned
            emitted = self._plain(tap)
            self.pending, self.alternatives = {}, {}
            self.scheduler.observe_skipped(emitted, time.perf_counter() - start, seq_ids)
            self.last_plan = Plan([RowPlan() for _ in emitted], 1)
            return self._finish(emitted, [None] * len(emitted), 1, start, forward_before, tap)
        rows = [self._candidates(seq, sat_ids, lookup) for seq in self.sequences]
        plan = self.scheduler.plan(rows)
        planned = time.perf_counter()
        accepted = [0] * len(rows)
        if plan.plain:
            emitted = self._plain(tap)
            self.pending, self.alternatives = {}, {}
            drafts = [None] * len(rows)
        else:
            nodes = [_nodes(row, p) for row, p in zip(rows, plan.rows)]
            alternatives = []
            emitted, self.last, nxt, accepted = fused_pass(
                self.model, self.cache, self.last, nodes, plan.width, list(sat_ids), self.banned, self.filler,
                self._draw(), tap, alternatives,
            )
            self._spend(emitted)
            self.pending = {s.seq_id: n for s, n in zip(self.sequences, nxt) if n}
            self.alternatives = {s.seq_id: a for s, a, n in zip(self.sequences, alternatives, nxt) if a and n}
            # each row's SAT drafts come first: its pending chain, then the alternatives to its first draft
            sat = [len(row.pending[: p.pending]) + len(row.alternatives[: p.alternatives]) for row, p in zip(rows, plan.rows)]
            self.counts = fused_counts([n.drafts for n in nodes], [n.parents for n in nodes], sat, accepted, emitted)
            drafts = [
                (max(depths(n.parents)), a, len(n.drafts)) if n.drafts else None for n, a in zip(nodes, accepted)
            ]
        pass_s = time.perf_counter() - planned
        self.scheduler.observe(plan, rows, emitted, pass_s, seq_ids)
        self.scheduler.planned(plan, seq_ids, planned - start, pass_s)
        self.last_plan = plan
        return self._finish(emitted, drafts, 1, start, forward_before, tap)

    def _candidates(self, seq: Sequence, sat_ids: list[int], lookup: int) -> RowCandidates:
        cap = len(sat_ids) if seq.num_sat is None else min(seq.num_sat, len(sat_ids))
        left = seq.max_new_tokens - len(seq.output_ids)
        remaining = left if self.closed else None
        if seq.num_sat == 0:
            return RowCandidates(drafting=False, remaining=remaining)
        room = left - 1  # drafts past max_new_tokens would be cut
        if room <= 0:
            return RowCandidates(remaining=remaining)
        trie = Trie(*self._lookup(seq, min(lookup, room))) if lookup else Trie()
        pending = self.pending.get(seq.seq_id, [])[: min(cap, room)]
        alternatives = self.alternatives.get(seq.seq_id, []) if pending else []
        return RowCandidates(pending, trie, min(cap, room), sampled=seq.seq_id in self.samplers, remaining=remaining,
                             alternatives=alternatives)

    def _finish(self, emitted, drafts, passes: int, start: float, forward_before: float, tap: LogprobTap | None = None) -> list[StepEvent]:
        """Stats, logprobs and stopping rules for a step's emitted tokens; finished rows leave."""
        forward_s = self.cache.forward_seconds - forward_before
        wall_s = time.perf_counter() - start
        events = []
        for row, (seq, tokens, offered) in enumerate(zip(self.sequences, emitted, drafts)):
            stats = seq.stats
            stats.iterations += 1
            stats.forward_passes += passes
            stats.forward_s += forward_s
            stats.decode_s += wall_s
            if offered is not None:
                stats.record_drafts(*offered)
            kept = seq.append(tokens, self.tokenizer)
            if tap is not None:
                seq.token_logprobs += tap.take(row, len(kept))
            stats.new_tokens += len(kept)
            events.append(StepEvent(seq, kept))
        self._drop(lambda s: s.finished)
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
        if self.scheduler is not None:
            for s in self.sequences:
                if gone(s):
                    self.scheduler.forget(s.seq_id)
        self.cache.select_rows(keep)
        self.last = self.last[keep]
        self.sequences = [self.sequences[i] for i in keep]
        kept = {s.seq_id for s in self.sequences}
        self.lookups = {i: index for i, index in self.lookups.items() if i in kept}
        self.samplers = {i: sampler for i, sampler in self.samplers.items() if i in kept}
        self.pending = {i: drafts for i, drafts in self.pending.items() if i in kept}
        self.alternatives = {i: alts for i, alts in self.alternatives.items() if i in kept}

    def _plain(self, tap: LogprobTap | None = None) -> list[list[int]]:
        """One plain step for every row (greedy, or a draw); returns the token each row emitted."""
        if not self.samplers:
            self.last = plain_step(self.model, self.cache, self.last, self.banned, tap)
            return [[t] for t in self.last.tolist()]
        logits = forward(self.model, self.cache, self.last[:, None])  # [B, 1, V]
        self.cache.advance(1)
        root = torch.zeros(len(self.sequences), 1, dtype=torch.long, device=self.device)  # depth 0, its own path
        self.last = self._draw()(logits, self.last[:, None], root, root[..., None])[:, 0]
        emitted = [[t] for t in self.last.tolist()]
        if tap is not None:
            tap(logits, [[0]] * len(emitted), emitted)
        self._spend(emitted)
        return emitted

    def _draw(self) -> Callable[..., torch.Tensor] | None:
        """What a pass's nodes yield when some rows sample: their draws (argmaxes elsewhere)."""
        if not self.samplers:
            return None
        samplers = [self.samplers.get(s.seq_id) for s in self.sequences]
        return lambda logits, tokens, depths, paths: sample_nodes(logits, tokens, depths, paths, samplers, self.banned)

    def _spend(self, emitted: list[list[int]]) -> None:
        """Each sampling row spent one uniform per token it emitted."""
        for seq, tokens in zip(self.sequences, emitted):
            sampler = self.samplers.get(seq.seq_id)
            if sampler is not None:
                sampler.advance(tokens)

    def _lookup(self, seq: Sequence, budget: int) -> tuple[list[int], list[int], list[float]]:
        """This row's prompt-lookup trie of up to ``budget`` nodes, (tokens, parents, scores)
        (an index per row, kept up to date)."""
        index = self.lookups.get(seq.seq_id)
        if index is None:
            index = self.lookups[seq.seq_id] = LookupIndex(seq.prompt_ids)
        index.extend(seq.output_ids[len(index.tokens) - len(seq.prompt_ids) :])
        return index.tree(budget)


def _nodes(row: RowCandidates, plan: RowPlan) -> RowNodes:
    """The drafts a row verifies: its first ``plan.pending`` SAT drafts (a chain), its first
    ``plan.alternatives`` alternatives to the first of them (under the root) and first
    ``plan.lookup`` trie nodes, then its draft block."""
    pending = row.pending[: plan.pending]
    alternatives = row.alternatives[: plan.alternatives]
    sat = pending + alternatives
    trie = row.lookup
    parents = [i - 1 for i in range(len(pending))] + [-1] * len(alternatives)
    parents += [p if p < 0 else p + len(sat) for p in trie.parents[: plan.lookup]]
    return RowNodes(sat + trie.tokens[: plan.lookup], parents, plan.block)

