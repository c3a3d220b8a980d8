"""Lossless greedy tree verification: several draft candidates per SAT position, one pass.

The draft pass is SDSAT's own ([last, sat_1..sat_k]); at SAT position i (depth i) it now
yields the top-c candidates by logit (SATs banned) instead of only the argmax. A static
*draft tree* says which candidate paths the verify pass checks:
- node 0 is the root, y0 (exact: the argmax at ``last``);
- every other node is (parent, depth, rank): the rank-th candidate at SAT position
  ``depth``, placed right after its parent. SAT drafts at depth i do not depend on the
  tokens before them in the tree, so every node at depth i draws from the same top-c list.

The verify pass feeds all n+1 nodes at once, node j at position length + depth_j, each
seeing the committed cache and its own ancestors only (the ancestor mask), and takes the
argmax z_j at every node. A node is *accepted* when it equals its parent's argmax and its
parent is accepted (the root always is). The deepest accepted node (ties: lowest index)
ends the accepted path. Emitted: the path's tokens (y0 and the accepted drafts) and the
bonus z at its last node. Every accepted node is what plain greedy decoding produces after
its ancestors, so the output is exactly plain greedy. The path's keys sit at slots
length + node index; :meth:`SlotCache.keep_slots` moves them to length + 0..a.

Two ways to make a tree:
- counts, spec "2,2,1,1,1": every node at depth i-1 gets the top-c_i candidates of depth i
  as children (a full product: 2 + 4 + 4 + 4 + 4 = 18 nodes and the root);
- paths, spec "0;1;0.0;1.0;0.0.0" (Medusa-style sparse list): each path lists candidate
  ranks from depth 1 down; every prefix of a path is added too. :func:`best_tree` picks
  the paths from observed ranks of the true tokens (``jobs/tree_search.py``).
Today's chain [y0, d_1..d_k] is the tree "1,1,...,1" (k ones).

With a draft head (:mod:`sdsat.model.draft_head`) a node's rank is among the head's guesses
given its parent's token (:meth:`DraftHead.tree`): the rank-r child of a node is the head's
r-th best continuation of that node's path, so each branch is one consistent continuation
and the rank-0 path is the head's chain. :func:`best_tree` then takes rank paths measured the
same way (``jobs/tree_search.py`` with a headed model).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..model.draft_head import get_head, top_candidates
from .decoding import forward, greedy
from .kv_cache import SlotCache
from .row_tree import RowTrees, accept_rows


@dataclass(frozen=True)
class TreeTensors:
    """A tree's index tensors on one device (N = n+1 nodes, D = depth)."""

    depths: torch.Tensor  # [N] long: position offset of each node
    parents: torch.Tensor  # [N] long: parent node (the root is its own parent here)
    ancestors: torch.Tensor  # [N, N] bool: ancestors[i, j] = node j is on the path root..i
    paths: torch.Tensor  # [N, D+1] long: paths[i, d] = node at depth d on root..i; d > depth_i: d
    candidate_index: torch.Tensor  # [N-1] long: node j>0 -> (depth_j - 1) * width + rank_j


@dataclass(frozen=True)
class DraftTree:
    """A static tree of draft candidates; nodes in order of depth, so parents come first."""

    parents: tuple[int, ...]  # [N]: parent node of each node (-1 for the root)
    depths: tuple[int, ...]  # [N]: 0 for the root, i for a candidate at SAT position i
    ranks: tuple[int, ...]  # [N]: candidate rank at that depth (0 = top-1; the root: 0)
    spec: str = field(default="", compare=False)  # how it was written (for logs and results)
    _on: dict = field(default_factory=dict, compare=False, repr=False)  # device -> TreeTensors

    @classmethod
    def from_paths(cls, paths, spec: str = "") -> "DraftTree":
        """A tree holding these candidate-rank paths and all their prefixes."""
        nodes = {()}
        for path in paths:
            path = tuple(int(r) for r in path)
            if not path or min(path) < 0:
                raise ValueError(f"tree path {path}: give one rank >= 0 per depth")
            nodes.update(path[:i] for i in range(1, len(path) + 1))
        order = sorted(nodes, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(order)}
        if len(order) == 1:
            raise ValueError("a draft tree needs at least one candidate")
        return cls(
            parents=tuple(index[p[:-1]] if p else -1 for p in order),
            depths=tuple(len(p) for p in order),
            ranks=tuple(p[-1] if p else 0 for p in order),
            spec=spec or ";".join(".".join(map(str, p)) for p in order[1:]),
        )

    @classmethod
    def from_counts(cls, counts) -> "DraftTree":
        """The full tree with counts[i-1] candidates per node at depth i."""
        counts = [int(c) for c in counts]
        if not counts or min(counts) < 1:
            raise ValueError(f"tree counts {counts}: give one count >= 1 per depth")
        return cls.from_paths(itertools.product(*(range(c) for c in counts)), ",".join(map(str, counts)))

    @classmethod
    def parse(cls, spec: str) -> "DraftTree":
        """"2,2,1,1,1" (counts per depth) or "0;1;0.0;1.0" (paths: ';' between, '.' within)."""
        spec = spec.strip()
        try:
            if ";" in spec or "." in spec:
                return cls.from_paths([p.split(".") for p in spec.split(";") if p.strip()], spec)
            return cls.from_counts(spec.split(","))
        except ValueError as exc:
            raise ValueError(f"bad tree spec {spec!r}: {exc}") from None

    @classmethod
    def chain(cls, k: int) -> "DraftTree":
        return cls.from_counts([1] * k)

    @property
    def size(self) -> int:
        """N = n+1: tokens in the verify pass."""
        return len(self.parents)

    @property
    def depth(self) -> int:
        """SATs the draft pass needs (k)."""
        return max(self.depths)

    @property
    def width(self) -> int:
        """Candidates needed per SAT position (top-c)."""
        return max(self.ranks) + 1

    def on(self, device: torch.device | str) -> TreeTensors:
        """The index tensors on this device (built once per device)."""
        key = str(device)
        if key not in self._on:
            self._on[key] = self._build(device)
        return self._on[key]

    def _build(self, device) -> TreeTensors:
        n, depth = self.size, self.depth
        ancestors = torch.zeros(n, n, dtype=torch.bool)
        paths = torch.arange(depth + 1).repeat(n, 1)  # [N, D+1]
        for node in range(n):
            walk = node
            while walk >= 0:
                ancestors[node, walk] = True
                paths[node, self.depths[walk]] = walk
                walk = self.parents[walk]
        ranks = torch.tensor(self.ranks[1:])
        depths = torch.tensor(self.depths)
        return TreeTensors(
            depths=depths.to(device),
            parents=torch.tensor([max(p, 0) for p in self.parents]).to(device),
            ancestors=ancestors.to(device),
            paths=paths.to(device),
            candidate_index=((depths[1:] - 1) * self.width + ranks).to(device),
        )


def best_tree(rank_paths, size: int) -> DraftTree:
    """The tree of ``size`` candidate nodes that accepts the most drafts on these observations.

    rank_paths: per observed draft pass, the rank of the true token among the candidates at
    depths 1..k (rank r: r tokens scored higher). A tree accepts the longest prefix of an
    observation that is one of its node paths, so its accepted drafts, summed over the
    observations, are the summed counts of its nodes' rank paths. The ``size`` most frequent
    rank prefixes maximise that, and they form a tree: a prefix is at least as frequent as
    its extensions (ties: shorter, then smaller ranks first).
    """
    counts = Counter(tuple(path[:d]) for path in rank_paths for d in range(1, len(path) + 1))
    ranked = sorted(counts, key=lambda p: (-counts[p], len(p), p))
    return DraftTree.from_paths(ranked[:size])


def true_token_ranks(logits: torch.Tensor, true: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """Rank of each true token among the draft logits (SATs banned). logits [B, k, V], true [B, k] -> [B, k]."""
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned, float("-inf"))
    return (logits > logits.gather(-1, true[..., None])).sum(dim=-1)


def as_tree(tree: "DraftTree | str | None") -> "DraftTree | None":
    return DraftTree.parse(tree) if isinstance(tree, str) else tree


def draft_candidates(logits: torch.Tensor, width: int, banned: torch.Tensor | None) -> torch.Tensor:
    """The top-``width`` tokens per SAT position, SATs banned. logits [B, k, V] -> [B, k, width].

    Rank 0 is :func:`greedy`'s argmax, so the chain tree drafts exactly what the chain does.
    """
    if width == 1:
        return greedy(logits, banned)[..., None]
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned, float("-inf"))
    return logits.topk(width, dim=-1).indices


def with_first_candidates(candidates: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """Replace the rank-0 candidate of every depth: candidates [B, k, C], drafts [B, k]."""
    out = candidates.clone()
    out[:, :, 0] = drafts
    return out


def tree_candidates(y0: torch.Tensor, candidates: torch.Tensor, tree: DraftTree) -> torch.Tensor:
    """The verify pass's tokens: y0 [B] and candidates [B, k, C] -> tokens [B, N] in node order."""
    index = tree.on(candidates.device).candidate_index  # [N-1]
    return torch.cat([y0[:, None], candidates.flatten(1)[:, index]], dim=1)


def tree_accept(
    tokens: torch.Tensor, z: torch.Tensor, tree: DraftTree
) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """Apply the acceptance rule. tokens [B, N] (node tokens), z [B, N] (verify argmaxes).

    Returns (accepted path per row: node indices root..last, a+1 of them; emitted tokens per
    row: the path's tokens and the bonus; the bonus per row [B]). One host sync.
    """
    t = tree.on(tokens.device)
    batch = tokens.shape[0]
    rows = RowTrees(
        depths=t.depths.expand(batch, -1),
        parents=t.parents.expand(batch, -1),
        ancestors=t.ancestors.expand(batch, -1, -1),
        paths=t.paths.expand(batch, -1, -1),
    )
    return accept_rows(tokens, z, rows)


def sdsat_tree_step(
    model,
    cache: SlotCache,
    last: torch.Tensor,
    sat_ids: torch.Tensor,
    banned: torch.Tensor | None,
    tree: DraftTree,
    candidate_override=None,
) -> tuple[list[list[int]], torch.Tensor, list[list[int]]]:
    """One draft-then-verify iteration over a draft tree. last [B], sat_ids [k] (k = tree depth).

    Returns (emitted tokens per row: y0, accepted drafts, bonus; new ``last`` [B]; accepted
    node path per row). candidate_override(candidates [B, k, C]) -> candidates replaces the
    draft candidates (oracle/garbage benchmarks; the SATs' own top-c, not the head's). With a
    draft head and no override, the nodes are the head's guesses given their parents.
    """
    if sat_ids.numel() != tree.depth:
        raise ValueError(f"tree {tree.spec!r} has depth {tree.depth}; it needs k={tree.depth} SATs, got {sat_ids.numel()}")
    batch = last.shape[0]
    input_ids = torch.cat([last[:, None], sat_ids[None, :].expand(batch, -1)], dim=1)  # [B, k+1]
    logits = forward(model, cache, input_ids)  # [B, k+1, V]
    cache.advance(1)  # keep `last`; the SAT keys beyond it are dropped
    y0 = greedy(logits[:, 0], banned)  # [B]
    head = get_head(model)
    if head is not None and candidate_override is None:  # every branch chained through the head
        tokens = head.tree(head.hidden[:, 1:], y0, head.hidden[:, 0], tree.parents, tree.depths, tree.ranks,
                           banned, top_candidates(logits[:, 1:]))  # [B, N]
    else:
        candidates = draft_candidates(logits[:, 1:], tree.width, banned)  # [B, k, C]
        if candidate_override is not None:
            candidates = candidate_override(candidates)
        tokens = tree_candidates(y0, candidates, tree)  # [B, N]
    t = tree.on(tokens.device)
    z = greedy(forward(model, cache, tokens, block_mask=t.ancestors, offsets=t.depths), banned)  # [B, N]
    paths, emitted, bonus = tree_accept(tokens, z, tree)
    cache.keep_slots(paths)  # y0 and the accepted drafts, moved next to each other
    return emitted, bonus, paths
