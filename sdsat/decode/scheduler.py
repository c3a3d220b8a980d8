"""The draft scheduler: before each pass, choose per row which drafts to verify.

This is the decoder's policy; the mechanics of a pass live in :mod:`sdsat.decode.fused`.
Each row offers four kinds of candidate nodes:
- its *pending* SAT drafts (made by the previous pass's draft block), a chain;
- with a draft head, *alternatives* to the first pending draft: the head's rank 1, 2, ...
  guesses for that token (siblings of it under the root, a draft tree's extra branches);
- its prompt-lookup trie (:mod:`sdsat.decode.lookup`), best-scoring nodes first;
- *block* positions: SATs run in this pass, whose guesses are the next pass's pending drafts.

A candidate's value is the tokens it is expected to add (:mod:`sdsat.decode.acceptance`): a
pending, alternative or lookup node its probability of being right; a block position the
value of the draft it makes, at the depth it will have after the pending drafts this pass
accepts, less what a query token of the next pass costs to verify it (:func:`_block_values`). Every list
is non-increasing in value and parents come first, so a row's best n nodes are the first ones
of each list. All rows of a pass are padded to one width q (query tokens per row), so once q
is chosen every row fills it with its q - 1 best nodes. The scheduler picks the q with the
most expected new tokens per second for the whole batch,

    rate(q) = sum over rows of (1 + value of its q - 1 best nodes) / cost(rows, q),

from a measured cost model (:mod:`sdsat.decode.cost`). q = 1 is a plain step, always a
candidate; drafting must beat it by ``margin``. A row's ``block`` is capped by its request's
num_sat; a row that takes no drafts contributes one token at any q.

Closed batches: in ``generate`` (and so the bench) no row joins, and the batch takes as many
passes as its slowest row needs. A drafting pass then gains what it moves the batch's end:
the most tokens any row has left, before the pass and (expected) after it. Moving the slowest
row 3 tokens on moves the end by only 1 when a row without drafts is 1 token behind it
(counting 3 there drafted whole 16-row passes at 3x a plain pass for one row); and, for the
others, only what finishing early saves: each token they gain is worth the cost of one row in
a pass, ``(cost(rows, 1) - cost(1, 1)) / (rows - 1) / cost(rows, 1)`` of a plain pass (the
average row, not the last one: the measured plain passes of 13 and 14 rows once differed
by a third of a pass, which made the 14th row look worth 0.32 passes and the batch draft at
width 5 for nothing). At batch 16 on a CPU a row is a few percent of a pass, so drafting must
move the slowest rows, all of them (:func:`_end_moves`); a serving engine's batch is open (new
requests take the freed rows) and counts every token.

Skipping: at a large batch, building every row's candidates and choosing costs a few percent
of a pass. While drafting does not even break even (its best rate below plain's), the next
passes run plain without planning: 1, 2, 4, ... passes, at most one per ``SKIP_PER_SHARE`` of
pass time that planning was measured to cost (none where planning is cheap, as at batch 1),
and never past a change of the batch's rows.

Exploration: lookup estimates need none (every trie is scored against the tokens that follow,
offered or not). SAT drafts and untried widths do: now and then a pass runs every row's
full draft block (and the next pass verifies what it made) or a width next to the best one
(plain included), but only while the predicted extra time of all exploring passes stays under ``explore_fraction`` of the time
decoded so far, and each choice that looked and lost waits twice as long for its next look.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .acceptance import Acceptance, depths, node_truth
from .cost import PassCost

PENDING, LOOKUP, BLOCK, ALTERNATIVE = 0, 1, 2, 3
EXPLORE_WIDTHS = (1, 2, 4, 8, 16, 32)  # an exploring pass tries the ones next to the best width (1: plain)
EXPLORE_WEIGHT = 0.5  # of an exploring pass's time in its shape's average
REALISM_EMA = 0.05  # weight of a drafting pass in the realised/expected ratio
REALISM_AGE = 0.01  # per pass without drafts, how far realism's evidence fades (toward 1)
PLAN_EMA = 0.1  # weight of a pass in the planning-time share
SKIP_PER_SHARE = 0.005  # planning may be skipped one pass per this share of pass time it costs
MAX_SKIP = 8
BLOCK_WINDOW = 9  # a block's extra time: the median over this many latest block passes
MAX_GAP = 16  # explore_every passes: the longest wait between looks at one choice


@dataclass
class Trie:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # -1: under the root; else an earlier node
    scores: list[float] = field(default_factory=list)  # best first


@dataclass
class RowCandidates:
    pending: list[int] = field(default_factory=list)  # SAT drafts from the previous block (a chain)
    lookup: Trie = field(default_factory=Trie)
    block: int = 0  # SAT positions this row may run (its request's num_sat)
    drafting: bool = True  # False: this row verifies no drafts (its request asked for plain decoding)
    sampled: bool = False  # the row samples: its acceptance is estimated apart from greedy rows'
    remaining: int | None = None  # tokens the row may still emit, in a closed batch (None: rows may join)
    alternatives: list[int] = field(default_factory=list)  # the draft head's rank 1.. guesses for pending[0]


@dataclass
class RowPlan:
    pending: int = 0  # leading pending drafts to verify
    lookup: int = 0  # leading trie nodes to verify
    block: int = 0  # SAT positions to run
    alternatives: int = 0  # leading alternatives to the first pending draft to verify

    @property
    def nodes(self) -> int:
        return self.pending + self.lookup + self.block + self.alternatives


@dataclass
class Plan:
    rows: list[RowPlan]
    width: int  # query tokens per row; 1: a plain step
    expected_tokens: float = 0.0
    predicted_s: float = 0.0
    explore: bool = False
    # tokens this pass itself is expected to emit, unscaled by realism: 1 per row plus its
    # pending and lookup nodes' values (a block position's value comes in the next pass)
    verifiable: float = 0.0
    end_move: float = 0.0  # closed batches: how far the pass is expected to move the batch's end (unscaled)

    @property
    def plain(self) -> bool:
        return self.width == 1


def _falling(values: list[float]) -> list[float]:
    """A chain's values capped by the ones before: a node is never worth more than its parent."""
    out, low = [], float("inf")
    for v in values:
        low = min(low, v)
        out.append(low)
    return out


def _block_values(pending: list[float], sat: list[float], slot: float = 0.0) -> list[float]:
    """What each draft block position is worth: the value of the draft it makes, less what
    verifying that draft will cost (``slot``: a query token of the next pass, in tokens at the
    plain rate). Block position j guesses the token j past the root; when the pass accepts a
    of the row's pending drafts (a chain: P(a >= d) is its d-th value), that guess becomes the
    next pass's draft at depth j - a, worth sat[j-a-1], and positions j <= a guess tokens
    already accepted (no draft, nothing to verify). The values are then pooled into a
    non-increasing list with the same sum over every pooled run (a later position is worth
    more than an earlier one when acceptance is likely, but needs the earlier ones run).

    The block's own cost is the pass's (its width and the block's measured extra). Crediting
    each position half its draft's value instead, as if the verify slot cost what the block
    slot does, undervalued blocks wherever a verified token is cheap and a block position
    dear (the adapter, the head): on a 2-core CPU with native bf16 SAT drafts alone then ran
    a block and a verify pass by turns and fell back to plain passes for long runs (1.02x)."""
    reach = [1.0] + pending + [0.0]  # P(a >= d), d = 0..c+1
    p_exact = [reach[d] - reach[d + 1] for d in range(len(pending) + 1)]
    values = []
    for j in range(1, len(sat) + 1):
        values.append(max(0.0, sum(p * (sat[j - a - 1] - slot) for a, p in enumerate(p_exact) if a < j)))
    runs: list[list[float]] = []  # [sum, count]: pool adjacent violators
    for v in values:
        runs.append([v, 1])
        while len(runs) > 1 and runs[-1][0] / runs[-1][1] > runs[-2][0] / runs[-2][1]:
            total, count = runs.pop()
            runs[-1][0] += total
            runs[-1][1] += count
    return [total / count for total, count in runs for _ in range(count)]


def _end_moves(values: list[list[tuple[float, int]]], remaining: list[int], most: int, nodes: int) -> list[float]:
    """Per n = 0..``nodes``: the expected extra tokens by which a pass of n drafts per row
    moves a closed batch's end, the most tokens any row has left, before the pass and after
    it (each row emits one token plus its accepted drafts a_i). With the rows independent,

        P(end moves >= d) = prod over rows of P(a_i >= d - (most - r_i)),

    which is 1 for a row more than d tokens ahead. P(a_i >= j) is taken as the row's j-th
    best value, as for a chain (exact for a chain of drafts, whose values fall with depth).
    This is E[min], not the min of the expectations: 16 level rows that each expect 0.6
    drafts accepted almost never all get one (0.6^16), and a pass that widens all 16 rows
    for that moved the end of a batch-16 run by nothing (0.90x plain in ``jobs/bench.py``).
    Depth d needs only drafts j <= d <= n deep, so its chance is the same for every n: the
    moves are running sums, computed once for all widths."""
    moves = [0.0]
    for d in range(1, nodes + 1):
        p = 1.0
        for items, r in zip(values, remaining):
            j = d - (most - r)
            if j <= 0:
                continue
            p *= min(1.0, items[j - 1][0]) if j <= len(items) else 0.0
            if p == 0.0:
                break
        if p == 0.0:  # each row's chance only falls with depth: no deeper move either
            return moves + [moves[-1]] * (nodes + 1 - len(moves))
        moves.append(moves[-1] + p)
    return moves


class _Fixed:
    """An injected cost function (rows, q) -> seconds: no learning."""

    def __init__(self, fn: Callable[[int, int], float]):
        self.fn = fn

    def predict(self, rows: int, q: int) -> float:
        return self.fn(rows, q)

    def observe(self, rows: int, q: int, seconds: float, weight: float | None = None) -> None:
        pass


def _without_blocks(cost):
    """A second cost model like ``cost`` (same start-up curve and measurements), for passes
    without a draft block; an injected cost function needs none (it does not learn)."""
    if isinstance(cost, PassCost):
        return PassCost(dict(cost.curve), ema=cost.ema, observed=dict(cost.observed))
    return cost


@dataclass
class _Watch:
    """A trie waiting for the tokens that follow its root."""

    trie: Trie
    depth: int
    sampled: bool
    truth: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        cost: PassCost | Callable[[int, int], float],
        *,
        margin: float = 0.05,
        explore_fraction: float = 0.01,
        explore_every: int = 16,
        max_width: int = 33,
    ):
        if margin < 0 or not 0 <= explore_fraction < 1 or explore_every < 1 or max_width < 1:
            raise ValueError("scheduler needs margin >= 0, 0 <= explore_fraction < 1, explore_every >= 1, max_width >= 1")
        self.cost = cost if hasattr(cost, "predict") else _Fixed(cost)
        # what each shape costs as seen in passes without a draft block: the reference a block
        # pass's extra is measured against (see block_extra)
        self.plain_cost = _without_blocks(self.cost)
        self.margin = margin
        self.explore_fraction = explore_fraction
        self.explore_every = explore_every
        self.max_width = max_width
        self.acceptance = Acceptance()
        self.watches: dict[int, list[_Watch]] = {}  # seq_id -> tries awaiting their truth
        self.passes = 0
        self.total_s = 0.0  # observed seconds of all passes
        self.explore_s = 0.0  # predicted extra seconds spent exploring
        self.explored = 0
        self.since_explore = 0
        self.verify_next = False  # the last pass explored SAT drafts: verify what it made
        self.explore_next: dict[tuple[int, int], int] = {}  # (batch, width; 0: SAT block) -> pass it is due at
        self.explore_gap: dict[tuple[int, int], int] = {}  # (batch, width) -> passes to wait after the next look
        self.widths: dict[int, int] = {}  # q -> passes
        # realised / expected extra tokens of drafting passes (EMA): per-node estimates can be
        # right on average and still miss what a batch's passes give (their errors add up),
        # so every drafting value is scaled by what such passes were measured to give: the
        # ratio of the two EMAs, capped at 1 (a ratio per pass, capped, is biased low: a pass
        # that expects 0.6 tokens gets 0 or 1 or 2 of them). Its evidence ages: each pass
        # without drafts moves it REALISM_AGE of the way back to 1 (:meth:`_age_realism`)
        self.realism = 1.0
        self._realised = self._expected = 1.0  # EMAs of drafting passes' extra tokens (a prior of 1 in 1)
        # the same for the batch's end in closed batches (:func:`_end_moves`): rows' estimates
        # that are right on average can still be wrong together about the slowest rows
        self.end_realism = 1.0
        self._end_realised = self._end_expected = 1.0
        self.plan_share = 0.0  # EMA of planning seconds / pass seconds
        self.skip_left = 0  # plain passes to run without planning
        self.skip_run = 0  # the length of the latest run of skipped passes
        self.skip_rows: tuple[int, ...] = ()  # the rows (seq ids) the skipping was decided for
        self.skipped = 0
        self._draft_ratio = 0.0  # the latest plan's best drafting rate / plain rate
        # rows -> seconds a pass with a draft block takes beyond the cost model's time for
        # its shape: the SAT adapter's hooks and the draft head run only in such passes (on a
        # 2-core CPU ~10 ms of a ~50 ms plain pass of the default model). A block pass teaches
        # the shape's cost its time less this extra. The excess is measured against plain_cost,
        # which only passes without a block teach: against the cost they teach themselves, a
        # width that only ever runs with a block could not tell its shape from its block, and
        # the two drifted apart with the machine's noise (the extra reached 130-150 ms, four
        # plain passes, on a 2-core CPU where the block costs ~20 ms, and fewer blocks ran). Never
        # below 0: a block pass faster than its shape's prediction says the shape was
        # mispredicted (an unmeasured width at a large batch is assumed dear), which that
        # pass's observation corrects. The median of the latest BLOCK_WINDOW passes' excess,
        # not an average: one pass that a shared machine stalls for a few hundred ms moved an
        # average (weight 0.2) to 82 ms, nearly two plain passes, and as the block then
        # stopped running nothing brought it back
        self.block_extra: dict[int, float] = {}
        self._block_overs: dict[int, deque] = {}

    # ---- choosing --------------------------------------------------------------------------

    def values(self, row: RowCandidates, slot: float = 0.0) -> list[tuple[float, int]]:
        """(value, source) of the row's candidates, best first (within a source, in order);
        slot: what a query token of the next pass costs, in tokens (:meth:`_slot_tokens`)."""
        if not row.drafting:
            return []
        with_lookup, kind, acc = bool(row.lookup.tokens), row.sampled, self.acceptance
        pending = _falling([acc.sat_p(d, with_lookup, kind) for d in range(1, len(row.pending) + 1)])
        sat = _falling([acc.sat_p(d, with_lookup, kind) for d in range(1, row.block + 1)])
        items = []
        for source, vals in (
            (PENDING, pending),
            (LOOKUP, [acc.lookup_p(s, kind) for s in row.lookup.scores]),
            (BLOCK, _block_values(pending, sat, slot)),
            (ALTERNATIVE, [acc.alt_p(r, with_lookup, kind) for r in range(1, len(row.alternatives) + 1)]),
        ):
            items += [(v, source) for v in _falling(vals)]
        items.sort(key=lambda item: -item[0])
        return items

    def plan(self, rows: list[RowCandidates]) -> Plan:
        """The pass to run next for these rows."""
        slots = {k: self._slot_tokens(len(rows), k) for k in {r.block for r in rows if r.block}}  # once per block size
        values = [self.values(r, slots.get(r.block, 0.0)) for r in rows]
        q, gain, seconds, end_move = self._best_width(values, [r.remaining for r in rows])
        best = self._allocate(values, q, gain, seconds)
        best.end_move = end_move
        plan = best
        if self.verify_next:
            plan = self._verify_pending(rows, best)
        elif self._explore_due():
            plan = self._exploring(rows, values, best) or best
        self.widths[plan.width] = self.widths.get(plan.width, 0) + 1
        if not best.plain:  # the best choice needs no waiting to be looked at again
            self.explore_gap.pop((len(rows), best.width), None)
            if any(p.block for p in best.rows):
                self.explore_gap.pop((len(rows), 0), None)
        return plan

    def skipping(self, seq_ids: list[int]) -> bool:
        """Whether the next pass over these rows runs plain without planning (see the module
        docstring); if so, report it with :meth:`observe_skipped`."""
        if self.skip_left <= 0 or tuple(seq_ids) != self.skip_rows:
            self.skip_left = 0
            return False
        self.skip_left -= 1
        return True

    def planned(self, plan: Plan, seq_ids: list[int], plan_s: float, pass_s: float) -> None:
        """After a planned pass: how long planning took against the pass, and how many of the
        next passes may skip it."""
        if pass_s > 0:
            self.plan_share += PLAN_EMA * (plan_s / pass_s - self.plan_share)
        allowed = min(MAX_SKIP, int(self.plan_share / SKIP_PER_SHARE))
        if plan.plain and not plan.explore and self._draft_ratio < 1.0 and allowed:
            self.skip_run = min(allowed, max(1, 2 * self.skip_run))
            self.skip_left = self.skip_run
            self.skip_rows = tuple(seq_ids)
        else:
            self.skip_run = self.skip_left = 0

    def observe_skipped(self, emitted: list[list[int]], seconds: float, seq_ids: list[int]) -> None:
        """Learn from a plain pass that ran without planning: its time, and the tokens that
        tries offered earlier were waiting for."""
        self.passes += 1
        self.skipped += 1
        self.since_explore += 1
        self.total_s += seconds
        self.widths[1] = self.widths.get(1, 0) + 1
        self.cost.observe(len(emitted), 1, seconds)
        self.plain_cost.observe(len(emitted), 1, seconds)
        self._age_realism()
        for out, seq_id in zip(emitted, seq_ids):
            self._advance(seq_id, out)

    def _slot_tokens(self, batch: int, k: int) -> float:
        """What one more query token per row costs in a pass over ``batch`` rows, in tokens at
        the plain rate: the average over k of them, (t(batch, 1 + k) / t(batch, 1) - 1) / k."""
        plain = self.cost.predict(batch, 1)
        return max(0.0, self.cost.predict(batch, 1 + k) / plain - 1.0) / k if plain > 0 else 0.0

    def _extra(self, batch: int) -> float:
        """Predicted extra seconds of a draft block in a pass over this many rows (measured at
        the nearest batch size; 0 until a block pass is seen)."""
        if not self.block_extra:
            return 0.0
        return self.block_extra[min(self.block_extra, key=lambda r: (abs(r - batch), r))]

    def _predict(self, batch: int, width: int, block: bool) -> float:
        """Predicted seconds of a pass of this shape, with a draft block in it or not."""
        return self.cost.predict(batch, width) + (self._extra(batch) if block else 0.0)

    def _best_width(self, values: list[list[tuple[float, int]]], remaining=None) -> tuple[int, float, float, float]:
        """(q, expected tokens, predicted seconds, expected move of a closed batch's end) of
        the best width for these rows."""
        batch = len(values)
        first_block = min((i + 2 for items in values for i, (_, src) in enumerate(items) if src == BLOCK), default=10**9)
        closed = batch > 1 and remaining is not None and all(r is not None for r in remaining)
        if closed:
            most = max(remaining)
            critical = [i for i, r in enumerate(remaining) if r >= most]
            plain = self.cost.predict(batch, 1)
            weight = min(1.0, max(0.0, plain - self.cost.predict(1, 1)) / (batch - 1) / plain)
        prefix = []
        for items in values:
            sums, total = [0.0], 0.0
            for v, _ in items:
                total += v
                sums.append(total)
            prefix.append(sums)
        top = min(self.max_width, 1 + max((len(v) for v in values), default=0))
        moves = _end_moves(values, remaining, most, top - 1) if closed else []
        best = None
        plain_rate = None
        best_drafting = 0.0  # the best rate of a width > 1
        for q in range(1, top + 1):
            got = [sums[min(q - 1, len(sums) - 1)] for sums in prefix]
            gain = sum(1.0 + self.realism * v for v in got)
            worth, low = gain, 0.0
            if closed:  # in tokens of the whole batch, as plain steps would give them
                low = moves[q - 1]  # how far the batch's end moves
                moved = self.end_realism * low
                worth = batch * (1.0 + self.realism * (moved + weight * max(0.0, sum(got) - len(critical) * moved)))
            seconds = self._predict(batch, q, q >= first_block)
            rate = worth / seconds
            if q == 1:
                plain_rate = rate
            else:
                best_drafting = max(best_drafting, rate)
            if best is None or rate > best[0]:
                best = (rate, q, gain, seconds, low)
        rate, q, gain, seconds, low = best
        self._draft_ratio = best_drafting / plain_rate
        if q > 1 and rate < plain_rate * (1 + self.margin):
            return 1, float(batch), self.cost.predict(batch, 1), 0.0
        return q, gain, seconds, low

    @staticmethod
    def _allocate(values, width: int, gain: float, seconds: float) -> Plan:
        plans, verifiable = [], 0.0
        for items in values:
            counts = [0, 0, 0, 0]
            verifiable += 1.0
            for v, source in items[: width - 1]:
                counts[source] += 1
                verifiable += v if source != BLOCK else 0.0
            plans.append(RowPlan(*counts))
        return Plan(plans, width, gain, seconds, verifiable=verifiable)

    # ---- exploring -------------------------------------------------------------------------

    def _explore_due(self) -> bool:
        self.since_explore += 1
        return self.since_explore >= self.explore_every

    def _exploring(self, rows: list[RowCandidates], values, best: Plan) -> Plan | None:
        """Every row's full draft block (or, without SATs, another width), if the budget allows."""
        batch = len(rows)
        if any(r.block and r.drafting for r in rows) and not any(p.block for p in best.rows) and self._due(batch, 0):
            plans = [
                RowPlan(p.pending, p.lookup, r.block if r.drafting else 0) for p, r in zip(best.rows, rows)
            ]
            width = min(self.max_width, 1 + max(p.nodes for p in plans))
            plans = [RowPlan(p.pending, p.lookup, min(p.block, width - 1 - p.pending - p.lookup)) for p in plans]
            again = True
        else:
            below = [w for w in EXPLORE_WIDTHS if w < best.width]
            above = [w for w in EXPLORE_WIDTHS if best.width < w <= self.max_width]
            others = [w for w in below[-1:] + above[:1] if self._due(batch, w)]
            if not others:
                return None
            width = others[self.explored % len(others)]
            plan = self._allocate(values, width, 0.0, 0.0)
            plans, again = plan.rows, False
        seconds = self._predict(batch, width, any(p.block for p in plans))
        extra = max(0.0, seconds - best.predicted_s)
        if self.explore_s + extra * (2 if again else 1) > self.explore_fraction * self.total_s:
            return None  # (a draft block's drafts are verified in the next pass, which costs about as much)
        self.explore_s += extra
        self.explored += 1
        self._backoff(batch, 0 if again else width)
        self.since_explore = 0
        self.verify_next = again
        gain = sum(1.0 + sum(v for v, _ in items[: p.pending + p.lookup]) for items, p in zip(values, plans))
        return Plan(plans, width, gain, seconds, explore=True)

    def _due(self, batch: int, width: int) -> bool:
        """Whether exploring this width (0: the SAT block) at this batch size is due: each
        look at a choice that is not the best doubles the wait before the next one (up to
        ``MAX_GAP`` times explore_every passes), so a machine where it never pays stops paying
        for looks, and a change is still noticed."""
        return self.passes >= self.explore_next.get((batch, width), 0)

    def _backoff(self, batch: int, width: int) -> None:
        gap = self.explore_gap.get((batch, width), self.explore_every)
        self.explore_next[(batch, width)] = self.passes + gap
        self.explore_gap[(batch, width)] = min(MAX_GAP * self.explore_every, 2 * gap)

    def _verify_pending(self, rows: list[RowCandidates], best: Plan) -> Plan:
        """The pass after an exploring draft block: verify every row's pending drafts."""
        self.verify_next = False
        plans = []
        for p, r in zip(best.rows, rows):
            pending = len(r.pending) if r.drafting else 0
            plans.append(RowPlan(pending, p.lookup, p.block))
        width = min(self.max_width, max(best.width, 1 + max(p.nodes for p in plans)))
        for p in plans:  # past the width: drop lookup nodes first, then block positions
            over = max(0, p.nodes - (width - 1))
            p.lookup -= min(over, p.lookup)
            over = max(0, p.nodes - (width - 1))
            p.block -= min(over, p.block)
            p.pending = min(p.pending, width - 1)
        seconds = self._predict(len(rows), width, any(p.block for p in plans))
        self.explore_s += max(0.0, seconds - best.predicted_s)
        return Plan(plans, width, best.expected_tokens, seconds, explore=True)

    # ---- learning --------------------------------------------------------------------------

    def observe(self, plan: Plan, rows: list[RowCandidates], emitted: list[list[int]], seconds: float, seq_ids: list[int]) -> None:
        """Learn from a pass: its time, and per row the tokens it emitted (accepted drafts and the bonus)."""
        self.passes += 1
        self.total_s += seconds
        # only what this pass can emit: a draft block's guesses are judged when verified,
        # through the SAT estimates (counting them here read every block as a broken promise)
        expected_extra = plan.verifiable - len(rows)
        if not plan.plain and not plan.explore and expected_extra > 0:
            realised = sum(len(out) for out in emitted) - len(rows)
            self._realised += REALISM_EMA * (realised - self._realised)
            self._expected += REALISM_EMA * (expected_extra - self._expected)
            self._rescale_realism()
        elif plan.plain:
            self._age_realism()
        if not plan.explore and plan.end_move > 0:
            most = max(r.remaining for r in rows)
            moved = most - max(r.remaining - len(out) for r, out in zip(rows, emitted)) - 1
            self._end_realised += REALISM_EMA * (max(0, moved) - self._end_realised)
            self._end_expected += REALISM_EMA * (plan.end_move - self._end_expected)
            self.end_realism = max(0.05, min(1.0, self._end_realised / self._end_expected))
        shape_s, weight = seconds, EXPLORE_WEIGHT if plan.explore else None  # an exploring pass is the rare fresh look at its shape: it counts more
        if any(p.block for p in plan.rows):  # what the block cost beyond the shape
            overs = self._block_overs.setdefault(len(rows), deque(maxlen=BLOCK_WINDOW))
            overs.append(seconds - self.plain_cost.predict(len(rows), plan.width))
            self.block_extra[len(rows)] = max(0.0, statistics.median(overs))
            shape_s = seconds - self.block_extra[len(rows)]
        else:
            self.plain_cost.observe(len(rows), plan.width, seconds, weight)
        self.cost.observe(len(rows), plan.width, shape_s, weight)
        for row, rp, out, seq_id in zip(rows, plan.rows, emitted, seq_ids):
            trie = row.lookup
            if rp.pending or row.alternatives:
                offered = node_truth(trie.tokens[: rp.lookup], trie.parents[: rp.lookup], out)
                right = {d for d, r in zip(depths(trie.parents[: rp.lookup]), offered) if r}
            if rp.pending:
                self.acceptance.observe_sat(row.pending[: rp.pending], out, right, bool(trie.tokens), row.sampled)
            if row.alternatives and out:  # every pass emits the token after the root: all are scored
                self.acceptance.observe_alt(row.alternatives, out[0], 1 in right, bool(trie.tokens), row.sampled)
            if trie.tokens:
                self.watches.setdefault(seq_id, []).append(_Watch(trie, max(depths(trie.parents)), row.sampled))
            self._advance(seq_id, out)

    def _age_realism(self) -> None:
        """A pass without drafts: realism's evidence fades a little (the realised EMA moves
        REALISM_AGE of the way to the expected one). Only drafting passes measure realism,
        and a low realism makes every pass plain: a few early passes that gave less than the
        first estimates promised (0.64) then held for the rest of a 16-prompt bench on the
        2-core AMD EPYC, 74% of its passes plain, while the exploring looks found the drafts
        right more often than ever. Aged, realism lets drafting be tried again within a
        hundred passes or so; if the estimates still overpromise, those passes say so."""
        self._realised += REALISM_AGE * (self._expected - self._realised)
        self._rescale_realism()

    def _rescale_realism(self) -> None:
        self.realism = max(0.05, min(1.0, self._realised / self._expected))  # only ever a discount

    def _advance(self, seq_id: int, tokens: list[int]) -> None:
        watches = self.watches.get(seq_id)
        if not watches:
            return
        waiting = []
        for w in watches:
            w.truth.extend(tokens)
            if len(w.truth) >= w.depth:
                self._score(w)
            else:
                waiting.append(w)
        self.watches[seq_id] = waiting

    def _score(self, w: _Watch) -> None:
        self.acceptance.observe_lookup(w.trie.scores, node_truth(w.trie.tokens, w.trie.parents, w.truth), w.sampled)

    def forget(self, seq_id: int) -> None:
        """A row left: score what its open tries can tell."""
        for w in self.watches.pop(seq_id, []):
            self._score(w)

    def snapshot(self) -> dict:
        return {
            "passes": self.passes,
            "explored": self.explored,
            "explore_share": self.explore_s / self.total_s if self.total_s else 0.0,
            "realism": self.realism,
            "end_realism": self.end_realism,
            "block_extra_s": {r: round(v, 5) for r, v in sorted(self.block_extra.items())},
            "skipped": self.skipped,
            "plan_share": self.plan_share,
            "widths": dict(sorted(self.widths.items())),
            "acceptance": self.acceptance.snapshot(),
        }

