"""Fused SDSAT: verify this iteration's drafts and draft the next ones in one pass.

SDSAT's two-step iteration spends a whole pass on drafting ([last, sat_1..sat_k]). Here the
draft block rides along in the verify pass instead. One pass feeds, per row, at positions
relative to ``last`` (at position L, not yet in the cache):

- the root, ``last`` (depth 0);
- the pending SAT drafts p_1..p_k, a chain under the root (depths 1..k);
- the prompt-lookup drafts l_1..l_m (:mod:`sdsat.decode.lookup`), a second chain (depths 1..m);
- the draft block sat_1..sat_k, a third chain under the root (depths 1..k): exactly the
  draft pass's SATs, seeing the cache, ``last`` and the SATs before them.

Every node sees the committed cache and its own ancestors only (:mod:`sdsat.decode.tree`'s
ancestor mask). A draft is accepted when it equals its parent's argmax and its parent is
accepted; SAT ids are never an argmax, so the block is never accepted. The deepest
accepted node (a = its depth) ends the path; emitted are its a drafts and the bonus, the
argmax there: a + 1 tokens, each what plain greedy decoding gives after the ones before,
so the output is exactly plain greedy. The bonus, at position L+a+1, is the next ``last``.

Next drafts: the argmax e_i at sat_i guesses the token at L+1+i. The next iteration needs
guesses for L+a+2 onwards: e_{a+1}..e_k (k-a of them; fresh when a = 0, the usual case);
the rest of the chain is filled with a SAT id, which is never accepted. One pass per
iteration, a + 1 tokens, against two passes and a + 2 tokens for the two-step iteration.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .decoding import forward, greedy
from .kv_cache import SlotCache
from .row_tree import accept_rows, row_trees
from .tree import DraftTree


@lru_cache(maxsize=256)
def layout(c: int, m: int, k: int) -> DraftTree:
    """Nodes: root; SAT-draft chain (c); lookup chain (m); draft block (k)."""
    if min(c, m, k) < 0 or c + m + k == 0:
        raise ValueError(f"fused layout needs lengths >= 0 and some nodes, got c={c}, m={m}, k={k}")
    parents, depths = [-1], [0]
    for length in (c, m, k):
        start = len(parents)
        for d in range(1, length + 1):
            parents.append(0 if d == 1 else start + d - 2)
            depths.append(d)
    n = len(parents)
    return DraftTree(parents=tuple(parents), depths=tuple(depths), ranks=(0,) * n, spec=f"fused c={c} m={m} k={k}")


def row_parents(c: int, lookup_parents: list[int], k: int) -> tuple[int, ...]:
    """One row's node parents: root; SAT-draft chain (c); the lookup trie (lookup_parents[i]:
    -1 under the root, else the index of its parent among the lookup nodes); draft block (k)."""
    base = layout(c, 0, k).parents if c + k else (-1,)
    start = 1 + c
    trie = tuple(0 if p < 0 else start + p for p in lookup_parents)
    block = tuple(0 if p == 0 else p + len(trie) for p in base[start:])
    return base[:start] + trie + block


def fused_step(
    model,
    cache: SlotCache,
    last: torch.Tensor,
    pending: torch.Tensor,
    lookup: torch.Tensor,
    sat_ids: torch.Tensor,
    banned: torch.Tensor | None,
    filler: int | None = None,
    lookup_parents: list[list[int]] | None = None,
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor, list[int]]:
    """One fused iteration. last [B], pending [B, c] (SAT drafts, SAT-id filled where none),
    lookup [B, m] (likewise), sat_ids [k] (the draft block; empty: no block, so no next drafts).
    lookup_parents: per row, each lookup node's parent (-1: the root; i: lookup node i, listed
    before it), so a row's lookup drafts form a trie; None: a chain in every row.
    With c = k = 0 this is prompt-lookup decoding, which needs no SATs. filler: the token that
    fills the next drafts past the block's guesses (default sat_ids[0]; any banned id works).

    Returns (emitted tokens per row: accepted drafts and the bonus; new ``last`` [B]; next
    SAT drafts [B, k]; accepted drafts per row).
    """
    batch, c = pending.shape
    m, k = lookup.shape[1], sat_ids.numel()
    if c + m + k == 0:
        raise ValueError(f"fused layout needs some nodes, got c={c}, m={m}, k={k}")
    if lookup_parents is None:
        parents = (layout(c, m, k).parents,) * batch
    else:
        if len(lookup_parents) != batch or any(len(p) != m for p in lookup_parents):
            raise ValueError(f"lookup_parents needs {m} parents for each of {batch} rows")
        parents = tuple(row_parents(c, p, k) for p in lookup_parents)
    t = row_trees(parents, last.device)
    block = sat_ids[None, :].expand(batch, -1)
    tokens = torch.cat([last[:, None], pending, lookup, block], dim=1)  # [B, N]
    z = greedy(forward(model, cache, tokens, block_mask=t.ancestors, offsets=t.depths), banned)  # [B, N]
    paths, emitted, bonus = accept_rows(tokens, z, t)
    cache.keep_slots(paths)  # last and the accepted drafts
    accepted = [len(p) - 1 for p in paths]
    nxt = z[:, :0]
    if k:
        guesses = z[:, 1 + c + m :]  # [B, k]: e_i guesses position L+1+i
        a = torch.tensor(accepted, device=last.device)[:, None]
        index = a + torch.arange(k, device=last.device)[None, :]  # e_{a+1}.. for L+a+2..
        fill = sat_ids[0] if filler is None else filler
        nxt = torch.where(index < k, guesses.gather(1, index.clamp(max=k - 1)), fill)
    return [row[1:] for row in emitted], bonus, nxt, accepted
