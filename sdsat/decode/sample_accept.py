"""Speculative sampling: accept drafts so that the output is distributed exactly as plain sampling.

Terms (docs/design.md, "Sampling"): the *target* at a node is the processed distribution of the
next token given the context and the node's path (:mod:`sdsat.decode.target`).

Deterministic drafts (lookup tries, greedy SAT drafts: one token per node, no proposal
distribution). Walk the tree from the root: draw the target token at the current node; if it
equals a child, descend into that child; otherwise emit it and stop; after a full path the
draw at the leaf is the bonus. Every emitted token is a draw from the target given the ones
before it, so the output is plain sampling's. The walk is :func:`sdsat.decode.row_tree.accept_rows`
with the draws in place of the argmaxes: :func:`sample_nodes` draws at every node at once
with the uniform number of the node's depth, and a row's random stream spends one uniform
per emitted token (:class:`RowSampler`). Output token n is then always the inverse CDF at
uniform n of the row's seeded stream: a seeded request gives the same tokens with any drafts
and beside any other rows, and the same as plain sampling up to float rounding.

Drafts drawn from a proposal q (:func:`accept_proposals`): the children of a node are tried in
turn; child x, drawn from q_x, is accepted with probability min(1, r(x) / q_x(x)), where r is
the target at the node; on rejection r becomes norm(max(0, r - q_x)) (the residual) and the next
child is tried; when none is accepted a token is drawn from r and the walk stops. This is the
multi-candidate form (SpecInfer): exact for any proposals as long as each child was drawn
independently of the others. A fixed draft is the proposal that puts all its mass on it.
"""

from __future__ import annotations

import torch

from .decoding import greedy
from .target import SamplingParams, draw, inverse_cdf, penalize

_CHUNK = 64  # uniforms drawn from a row's generator at a time


class RowSampler:
    """One request's sampling state: its params, its stream of uniforms and its generated tokens.

    Uniform n of the stream decides output token n; the stream is drawn from a CPU generator in
    fixed chunks, so it is the same whatever the drafts, the batch or the device.
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = params.generator()
        self.stream = torch.empty(0, dtype=torch.float64)  # uniforms not spent yet
        self.generated: list[int] = []  # tokens emitted so far (for the penalties)

    def uniforms(self, n: int) -> torch.Tensor:
        """The next n uniforms [n], not spent."""
        while self.stream.numel() < n:
            self.stream = torch.cat([self.stream, torch.rand(_CHUNK, dtype=torch.float64, generator=self.generator)])
        return self.stream[:n]

    def advance(self, emitted: list[int]) -> None:
        """These tokens were emitted: spend their uniforms."""
        self.uniforms(len(emitted))
        self.stream = self.stream[len(emitted) :]
        self.generated.extend(emitted)

    def counts(self, vocab: int, device) -> torch.Tensor:
        """How often each token was generated [V]."""
        ids = torch.tensor(self.generated, dtype=torch.long, device=device)
        return torch.bincount(ids, minlength=vocab)[:vocab].float()


def sample_nodes(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    depths: torch.Tensor,
    paths: torch.Tensor,
    samplers: list[RowSampler | None],
    banned: torch.Tensor | None,
) -> torch.Tensor:
    """The token each node's target draws, for the deterministic-draft walk.

    logits [B, N, V] at N nodes; tokens [B, N] (node tokens, the root first); depths [B, N];
    paths [B, N, D+1] (node at depth d on root..node, as :class:`sdsat.decode.row_tree.RowTrees`);
    samplers [B] (None: a greedy row, the argmax). Returns z [B, N]: the draw at every node with
    the uniform of its depth (argmax where temperature is 0). Spends no uniforms: the caller
    advances each row's sampler by the tokens it emitted.
    """
    device = logits.device
    rows = [i for i, s in enumerate(samplers) if s is not None]
    if len(rows) < len(samplers):
        z = greedy(logits, banned)  # [B, N]
        if not rows:
            return z
    else:
        z = torch.empty(logits.shape[:2], dtype=torch.long, device=device)
    index = torch.tensor(rows, device=device)
    own = [samplers[i] for i in rows]
    sub = logits[index].float()  # [R, N, V]: a copy, processed in place
    if banned is not None and banned.numel():
        sub.index_fill_(-1, banned, float("-inf"))
    if any(s.params.penalised for s in own):
        sub = _penalised(sub, tokens[index], depths[index], paths[index], own)
    hot = [j for j, s in enumerate(own) if not s.params.greedy]
    out = sub.argmax(dim=-1) if len(hot) < len(own) else torch.empty(sub.shape[:2], dtype=torch.long, device=device)
    if hot:  # [R, N]: the argmax where temperature is 0, else a draw
        h = torch.tensor(hot, device=device)
        width = paths.shape[2]
        u = torch.stack([own[j].uniforms(width) for j in hot]).to(device)  # [H, D+1]
        u_node = u.gather(1, depths[index][h])  # [H, N]: a node draws with its depth's uniform
        out[h] = draw(sub if len(hot) == len(own) else sub[h], [own[j].params for j in hot], u_node)
    z[index] = out
    return z


def _penalised(logits, tokens, depths, paths, samplers: list[RowSampler]) -> torch.Tensor:
    """Penalties at every node: the row's generated tokens and the drafts on the node's path.
    logits [R, N, V], tokens, depths [R, N], paths [R, N, D+1]."""
    device = logits.device
    vocab = logits.shape[-1]
    counts = torch.stack([s.counts(vocab, device) for s in samplers])  # [R, V]
    presence = torch.tensor([s.params.presence_penalty for s in samplers], device=device)
    frequency = torch.tensor([s.params.frequency_penalty for s in samplers], device=device)
    below = paths[:, :, 1:]  # [R, N, D]: the path past the root
    path = tokens.gather(1, below.flatten(1)).view_as(below)
    depth = torch.arange(1, below.shape[2] + 1, device=device)
    path = torch.where(depth <= depths[..., None], path, -1)
    return penalize(logits, counts, presence, frequency, path)


def accept_proposals(
    tokens: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    parents: list[list[int]],
    u: torch.Tensor,
) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """The min(1, p/q) rule with residual draws, children tried in index order (module docstring).

    tokens [B, N] (node 0: the root); p [B, N, V]: the target after each node; q [B, N, V]: the
    proposal node i's token was drawn from, in its parent's context (row 0 unused); parents:
    per row, each node's parent as :func:`sdsat.decode.row_tree.row_trees` takes them; u [B, D+1, S+1] uniforms
    (S: most children of a node): u[:, d, s] decides the s-th child tried at depth d, u[:, d, S]
    the draw that stops the walk there.

    Returns (path per row: node indices root..last, a+1 of them; emitted tokens per row: the
    path's drafts and the final draw; the final draw [B]), like accept_rows. One host sync.
    """
    batch, n = tokens.shape
    device = tokens.device
    children = _children(parents, n, device)  # [B, N, S]
    depth, width = u.shape[1] - 1, children.shape[2]
    if u.shape[2] < width + 1:
        raise ValueError(f"u needs {width + 1} uniforms per depth, got {u.shape[2]}")
    rows = torch.arange(batch, device=device)
    cur = torch.zeros(batch, dtype=torch.long, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    r = p[rows, 0].float()  # [B, V]: the target (then the residual) at the current node
    final = torch.zeros(batch, dtype=torch.long, device=device)
    steps = [cur]
    for d in range(depth + 1):
        moved = torch.zeros_like(alive)
        nxt = cur
        for s in range(width):
            child = children[rows, cur, s]  # [B]
            trying = alive & ~moved & (child >= 0)
            child = child.clamp(min=0)
            x = tokens[rows, child]
            qc = q[rows, child].float()  # [B, V]
            take = trying & (u[:, d, s].to(r.dtype) * qc[rows, x] < r[rows, x])
            residual = (r - qc).clamp(min=0)
            total = residual.sum(dim=-1, keepdim=True)
            residual = torch.where(total > 0, residual / total.clamp(min=1e-30), r)
            r = torch.where((trying & ~take)[:, None], residual, r)
            nxt = torch.where(take, child, nxt)
            moved = moved | take
        stop = alive & ~moved
        final = torch.where(stop, inverse_cdf(r, u[:, d, width]), final)
        alive, cur = moved, nxt
        r = torch.where(moved[:, None], p[rows, cur].float(), r)
        steps.append(cur)
    nodes = torch.stack(steps, dim=1)  # [B, D+2]: cur after each depth (repeats once stopped)
    a = (nodes[:, 1:] != nodes[:, :-1]).sum(dim=1)  # [B]: drafts accepted
    out = torch.cat([a[:, None], nodes, tokens.gather(1, nodes), final[:, None]], dim=1).tolist()  # the one host sync
    w = depth + 2
    paths = [row[1 : row[0] + 2] for row in out]
    emitted = [row[2 + w : 2 + w + row[0]] + [row[-1]] for row in out]
    return paths, emitted, final


def _children(parents: list[list[int]], n: int, device) -> torch.Tensor:
    """children[b, i, s]: node i's s-th child in row b (-1: none) [B, N, S]."""
    lists = [[[] for _ in range(n)] for _ in parents]
    for row, ps in zip(lists, parents):
        for i, parent in enumerate(ps):
            if i:
                row[parent].append(i)
    width = max((len(c) for row in lists for c in row), default=0)
    return torch.tensor([[c + [-1] * (width - len(c)) for c in row] for row in lists], dtype=torch.long, device=device).view(
        len(parents), n, width
    )
