"""Fused SDSAT: verify this iteration's drafts and draft the next ones in one pass.

SDSAT's two-step iteration spends a whole pass on drafting ([last, sat_1..sat_k]). Here the
draft block rides along in the verify pass instead. One pass feeds, per row, at positions
relative to ``last`` (at position L, not yet in the cache):

- the root, ``last`` (depth 0);
- the row's drafts, a tree under the root: its pending SAT drafts p_1..p_c (a chain), with a
  draft head its alternatives to p_1 (the head's next best guesses for that token, siblings
  of p_1) and its prompt-lookup trie (:mod:`sdsat.decode.lookup`), as many of each as the
  scheduler chose (:mod:`sdsat.decode.scheduler`);
- the row's draft block sat_1..sat_b, a chain under the root: exactly the draft pass's SATs,
  seeing the cache, ``last`` and the SATs before them;
- filler nodes under the root, so that every row has the pass's width: never accepted (the
  acceptance rule is told which nodes are real), and a standard token, so that they do not
  switch on the SAT adapter, which acts on SAT ids.

Every node sees the committed cache and its own ancestors only (:mod:`sdsat.decode.tree`'s
ancestor mask). A draft is accepted when it equals its parent's argmax and its parent is
accepted; SAT ids are never an argmax, so the block is never accepted. The deepest
accepted node (a = its depth) ends the path; emitted are its a drafts and the bonus, the
argmax there: a + 1 tokens, each what plain greedy decoding gives after the ones before,
so the output is exactly plain greedy. The bonus, at position L+a+1, is the next ``last``.

Next drafts: the argmax e_i at sat_i guesses the token at L+1+i. The next iteration needs
guesses for L+a+2 onwards: e_{a+1}..e_b (b-a of them; all b when a = 0, the usual case).
One pass per iteration, a + 1 tokens, against two passes and a + 2 tokens for the
two-step iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.draft_head import get_head, top_candidates

HEAD_ALTERNATIVES = 2  # siblings of a row's first next draft the head offers the scheduler (its ranks 1..2)
from .decoding import forward, greedy
from .kv_cache import SlotCache
from .row_tree import accept_rows, row_trees


@dataclass
class RowNodes:
    """One row's nodes in a fused pass, after its root ``last``."""

    drafts: list[int] = field(default_factory=list)  # tokens to verify
    parents: list[int] = field(default_factory=list)  # per draft: -1 (the root) or an earlier draft's index
    block: int = 0  # SAT positions to run after the drafts (a chain under the root)


def row_layout(row: RowNodes, width: int) -> tuple[int, ...]:
    """Node parents for one row padded to ``width`` nodes: root, drafts, block, filler (under the root)."""
    n = len(row.drafts)
    if len(row.parents) != n or any(not -1 <= p < i for i, p in enumerate(row.parents)):
        raise ValueError(f"draft parents must be -1 or an earlier draft's index, got {row.parents}")
    if 1 + n + row.block > width:
        raise ValueError(f"{n} drafts and a block of {row.block} do not fit a width of {width}")
    parents = [-1] + [0 if p < 0 else 1 + p for p in row.parents]
    parents += [0 if j == 0 else n + j for j in range(row.block)]
    return tuple(parents + [0] * (width - len(parents)))


def fused_pass(
    model,
    cache: SlotCache,
    last: torch.Tensor,
    rows: list[RowNodes],
    width: int,
    sat_ids: list[int],
    banned: torch.Tensor | None,
    filler: int,
    draw: Callable[..., torch.Tensor] | None = None,
    on_logits=None,
    next_alternatives: list | None = None,
) -> tuple[list[list[int]], torch.Tensor, list[list[int]], list[int]]:
    """One fused iteration over ``width`` query tokens per row. last [B]; rows[i]: row i's
    drafts (a tree under its root) and draft block (sat_ids[:block]); filler (a standard token,
    never accepted) pads every row to ``width``. draw(logits, tokens,
    depths, paths) -> tokens [B, n]: what the root and draft nodes yield instead of their argmax
    where rows sample (:func:`sdsat.decode.sample_accept.sample_nodes`); the block's guesses stay
    argmaxes (greedy SAT drafts, one token per node). on_logits(logits, nodes, tokens): given
    the pass's logits and, per row, the accepted path's nodes and the emitted tokens
    (:class:`sdsat.decode.logprobs.LogprobTap`). next_alternatives: with a draft head, a list
    that receives per row the head's next HEAD_ALTERNATIVES best guesses after the first of
    its next drafts (siblings of that draft: the tokens a draft tree would verify beside it).

    Returns (emitted tokens per row: accepted drafts and the bonus; new ``last`` [B]; next SAT
    drafts per row: the block's guesses past what was accepted; accepted drafts per row).
    """
    if width < 2:
        raise ValueError(f"a fused pass needs a width of at least 2, got {width}")
    if any(r.block > len(sat_ids) for r in rows):
        raise ValueError(f"a draft block longer than the {len(sat_ids)} SATs given")
    parents = tuple(row_layout(r, width) for r in rows)
    table = []
    for r in rows:
        nodes = r.drafts + sat_ids[: r.block]
        table.append(nodes + [filler] * (width - 1 - len(nodes)))
    t = row_trees(parents, last.device)
    tokens = torch.cat([last[:, None], torch.tensor(table, dtype=torch.long, device=last.device)], dim=1)  # [B, width]
    logits = forward(model, cache, tokens, block_mask=t.ancestors, offsets=t.depths)  # [B, width, V]
    z = greedy(logits, banned)  # [B, width]
    drawn = z
    if draw is not None:  # past the longest row's drafts are block and filler nodes: never accepted
        n = 1 + max(len(r.drafts) for r in rows)
        drawn = torch.cat([draw(logits[:, :n], tokens[:, :n], t.depths[:, :n], t.paths[:, :n]), z[:, n:]], dim=1)
    real = torch.tensor([1 + len(r.drafts) for r in rows], device=last.device)  # the root and the drafts
    valid = torch.arange(width, device=last.device)[None, :] < real[:, None]  # [B, width]
    paths, emitted, bonus = accept_rows(tokens, drawn, t, valid)
    if on_logits is not None:
        on_logits(logits, paths, [row[1:] for row in emitted])
    cache.keep_slots(paths)  # last and the accepted drafts
    accepted = [len(p) - 1 for p in paths]
    head = get_head(model)
    if head is not None and any(r.block > a for r, a in zip(rows, accepted)):
        nxt, alternatives = _head_guesses(head, logits, rows, accepted, bonus, banned, next_alternatives is not None)
        if next_alternatives is not None:
            next_alternatives.extend(alternatives)
    else:
        guesses = z.tolist() if any(r.block for r in rows) else None
        nxt = []
        for i, (r, a) in enumerate(zip(rows, accepted)):
            start = 1 + len(r.drafts)  # e_j, at block position j, guesses the token j + 1 past the root
            nxt.append(guesses[i][start + a : start + r.block] if r.block else [])
        if next_alternatives is not None:
            next_alternatives.extend([] for _ in rows)
    return [row[1:] for row in emitted], bonus, nxt, accepted


def _head_guesses(
    head, logits, rows: list[RowNodes], accepted: list[int], bonus: torch.Tensor, banned, alternatives: bool = False
) -> tuple[list[list[int]], list[list[int]]]:
    """The next SAT drafts through the draft head: for a row that accepted a drafts, block
    positions a.. guess one after another, the first conditioned on the bonus (the token
    just before its target), all on the root's hidden state (the block's anchor); each
    guess among its block position's top tokens (:func:`top_candidates`). With
    ``alternatives``, also per row the head's rank 1..HEAD_ALTERNATIVES guesses for the first
    draft (none for a row without next drafts)."""
    counts = [max(r.block - a, 0) for r, a in zip(rows, accepted)]
    starts = [1 + len(r.drafts) + a for r, a in zip(rows, accepted)]
    width = head.hidden.shape[1]
    index = torch.tensor([[min(s + j, width - 1) for j in range(max(counts))] for s in starts], device=bonus.device)
    hidden = head.hidden.gather(1, index[..., None].expand(-1, -1, head.hidden.shape[-1]))  # [B, n, H]
    among = top_candidates(logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1])))
    siblings = HEAD_ALTERNATIVES if alternatives else 0
    return head.guess(hidden, bonus, head.hidden[:, 0], counts, banned, among, siblings)  # anchor: the root
