"""Draft trees whose shape differs from row to row, verified in one batched pass.

:class:`sdsat.decode.tree.DraftTree` is one static shape for every row. Prompt-lookup drafts are
tries built from each row's own history (:mod:`sdsat.decode.lookup`), so each row brings its own
parents. Rows are padded to the same node count N; a row's nodes are listed parents first.
The acceptance rule is :mod:`sdsat.decode.tree`'s: a node is accepted when it equals its parent's
argmax and its parent is accepted; the deepest accepted node (ties: the lowest index) ends
the path, and emitted are the path's tokens and the bonus argmax there.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class RowTrees:
    """Index tensors of B trees of N nodes each (node 0 is every row's root)."""

    depths: torch.Tensor  # [B, N] long: position offset of each node
    parents: torch.Tensor  # [B, N] long: parent node (the root is its own parent here)
    ancestors: torch.Tensor  # [B, N, N] bool: ancestors[b, i, j] = node j is on the path root..i
    paths: torch.Tensor  # [B, N, D+1] long: paths[b, i, d] = node at depth d on root..i (0 past depth_i)

    @property
    def depth(self) -> int:
        return self.paths.shape[2] - 1


def row_trees(parents: tuple[tuple[int, ...], ...], device) -> RowTrees:
    """Tensors for these trees: parents[b][i] is node i's parent in row b (-1 for the root,
    node 0); every row has the same node count and lists a node after its parent."""
    if len({len(p) for p in parents}) != 1:
        raise ValueError(f"row trees need the same node count in every row, got {sorted({len(p) for p in parents})}")
    rows = [_one_tree(tuple(p), str(device)) for p in parents]
    width = max(r[3].shape[1] for r in rows)
    return RowTrees(
        depths=torch.stack([r[0] for r in rows]),
        parents=torch.stack([r[1] for r in rows]),
        ancestors=torch.stack([r[2] for r in rows]),
        paths=torch.stack([torch.nn.functional.pad(r[3], (0, width - r[3].shape[1])) for r in rows]),
    )


@lru_cache(maxsize=1024)
def _one_tree(parents: tuple[int, ...], device: str) -> tuple[torch.Tensor, ...]:
    """(depths [N], parents [N], ancestors [N, N], paths [N, depth+1]) of one tree, built once."""
    if not parents or parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i):
        raise ValueError(f"tree parents {parents}: node 0 is the root (-1), every other node's parent comes before it")
    chains: list[list[int]] = []  # root..i per node
    for i, p in enumerate(parents):
        chains.append([0] if i == 0 else chains[p] + [i])
    n, width = len(parents), max(len(c) for c in chains)
    ancestors = [[False] * n for _ in range(n)]
    for i, chain in enumerate(chains):
        for j in chain:
            ancestors[i][j] = True
    return (
        torch.tensor([len(c) - 1 for c in chains], device=device),
        torch.tensor([max(p, 0) for p in parents], device=device),
        torch.tensor(ancestors, device=device),
        torch.tensor([c + [0] * (width - len(c)) for c in chains], device=device),
    )


def accept_rows(
    tokens: torch.Tensor, z: torch.Tensor, t: RowTrees, valid: torch.Tensor | None = None
) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """The acceptance rule. tokens [B, N] (node tokens), z [B, N] (argmaxes at the nodes);
    valid [B, N] bool: the nodes that may be accepted (None: all; padding is not).

    Returns (accepted path per row: node indices root..last, a+1 of them; emitted tokens per
    row: the path's tokens and the bonus; the bonus per row [B]). One host sync.
    """
    n = tokens.shape[1]
    correct = tokens == z.gather(1, t.parents)  # [B, N]: node equals its parent's argmax
    correct[:, 0] = True  # the root is exact
    if valid is not None:
        correct &= valid
    broken = t.ancestors & ~correct[:, None, :]  # [B, N, N]: a wrong node on root..i
    accepted = ~broken.any(dim=2)  # [B, N]
    order = t.depths * n + (n - 1 - torch.arange(n, device=tokens.device))  # deepest, then first
    best = torch.where(accepted, order, -1).argmax(dim=1)  # [B]
    rows = torch.arange(len(best), device=tokens.device)
    path_nodes = t.paths[rows, best]  # [B, D+1]
    path_tokens = tokens.gather(1, path_nodes)  # [B, D+1]
    bonus = z.gather(1, best[:, None])[:, 0]  # [B]
    a = t.depths[rows, best]  # [B]
    width = t.depth + 1
    out = torch.cat([a[:, None], path_nodes, path_tokens, bonus[:, None]], dim=1).tolist()  # the one host sync
    paths = [row[1 : row[0] + 2] for row in out]
    emitted = [row[1 + width : 2 + width + row[0]] + [row[-1]] for row in out]
    return paths, emitted, bonus
