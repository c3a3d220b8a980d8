"""Greedy decoding steps: plain, and SDSAT's two-step draft-then-verify.

Terms (docs/design.md): for each row, ``last`` is its newest token, not yet in the KV cache.
- draft pass: feed [last, sat_1..sat_k]. The argmax at ``last`` is y0 (exact); the argmax
  at sat_i is draft d_i. Keep ``last`` in the cache, drop the SAT keys.
- verify pass: feed [y0, d_1..d_k] and take argmaxes z_0..z_k. a = the longest prefix with
  d_{i+1} == z_i (accepted drafts). Keep y0, d_1..d_a; emit y0, d_1..d_a and the bonus
  z_a, which becomes ``last``. Two passes, a + 2 tokens, identical to plain greedy.

All functions take a batch; rows keep their own cache lengths (:class:`SlotCache`).
"""

from __future__ import annotations

import torch

from ..model.draft_head import get_head, top_candidates
from .kv_cache import SlotCache

PREFILL_CHUNK = 512  # prompt tokens per prefill pass


def forward(
    model,
    cache: SlotCache,
    input_ids: torch.Tensor,
    block_mask: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run q new tokens per row ([B, q]) at each row's own positions; return logits [B, q, V].

    block_mask [q, q] bool: which new tokens see which (default causal); offsets [q]: their
    positions past each row's length (default 0..q-1); either may have a leading batch dim.
    The cache's lengths are not advanced: the caller commits what it keeps.
    """
    return _timed(model, cache, input_ids, block_mask, offsets).logits


def _timed(module, cache: SlotCache, input_ids: torch.Tensor, block_mask=None, offsets=None):
    """Run ``module`` over the new tokens, adding its time to ``cache.forward_seconds``."""
    cache.timer.start()
    q = input_ids.shape[1]
    mask = cache.prepare(q, cache.dtype, block_mask)
    out = module(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=cache.position_ids(q, offsets),
        cache=cache,
        use_cache=True,
    )
    cache.timer.stop()
    return out


def greedy(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """Argmax over the vocabulary with ``banned`` ids (the SATs) never chosen. [..., V] -> [...]"""
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned, float("-inf"))
    return logits.argmax(dim=-1)


def prefill(
    model, cache: SlotCache, prompts: list[list[int]], pad_id: int, on_hidden=None, chunk: int = PREFILL_CHUNK
) -> torch.Tensor:
    """Write every prompt but its last token into the cache; return ``last`` [B].

    Prompts of different lengths are right-padded: the pads sit beyond each row's length,
    so no real token sees them and the next pass overwrites them. Passes cover at most
    ``chunk`` tokens per row, so activation memory stays bounded for long prompts.
    on_hidden(hidden [B, W, H]): called with the last hidden states of the whole prompt
    (for prompt log-probabilities).
    """
    device = cache.device
    body = [p[:-1] for p in prompts]
    width = max(len(b) for b in body)
    if width:
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        for row, tokens in enumerate(body):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        hiddens = []
        for start in range(0, width, chunk):
            hidden = forward_hidden_only(model, cache, ids[:, start : start + chunk])
            cache.advance([min(max(len(b) - start, 0), chunk) for b in body])
            if on_hidden is not None:
                hiddens.append(hidden)
        if on_hidden is not None:
            on_hidden(torch.cat(hiddens, dim=1))
    return torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)


def forward_hidden_only(model, cache: SlotCache, input_ids: torch.Tensor) -> torch.Tensor:
    """A pass that fills the cache and skips the LM head (prefill needs no logits); returns
    the last hidden states [B, q, H]."""
    return _timed(model.get_decoder(), cache, input_ids).last_hidden_state


def plain_step(model, cache: SlotCache, last: torch.Tensor, banned: torch.Tensor | None, on_logits=None) -> torch.Tensor:
    """One plain greedy step: commit ``last``, return the next token per row [B].

    on_logits(logits, nodes, tokens): a :class:`sdsat.decode.logprobs.LogprobTap` (or None).
    """
    logits = forward(model, cache, last[:, None])  # [B, 1, V]
    cache.advance(1)
    tokens = greedy(logits[:, 0], banned)
    if on_logits is not None:
        on_logits(logits, [[0]] * len(tokens), tokens[:, None].tolist())
    return tokens


def draft(
    model, cache: SlotCache, last: torch.Tensor, sat_ids: torch.Tensor, banned: torch.Tensor | None, on_logits=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft pass. last [B], sat_ids [k] -> (y0 [B], drafts [B, k]); commits ``last`` only.
    on_logits: given the logits that decided y0 (see :func:`plain_step`)."""
    batch = last.shape[0]
    input_ids = torch.cat([last[:, None], sat_ids[None, :].expand(batch, -1)], dim=1)  # [B, k+1]
    logits = forward(model, cache, input_ids)  # [B, k+1, V]
    tokens = greedy(logits, banned)  # [B, k+1]
    cache.advance(1)  # keep `last`; the SAT keys beyond it are dropped
    if on_logits is not None:
        on_logits(logits, [[0]] * batch, tokens[:, :1].tolist())
    head = get_head(model)
    if head is not None and sat_ids.numel():  # drafts one after another, d_1 conditioned on y0
        chained = head.chain(
            head.hidden[:, 1:], tokens[:, 0], head.hidden[:, 0], [sat_ids.numel()] * batch, banned, top_candidates(logits[:, 1:])
        )
        return tokens[:, 0], torch.tensor(chained, dtype=torch.long, device=last.device)
    return tokens[:, 0], tokens[:, 1:]


def verify(
    model, cache: SlotCache, y0: torch.Tensor, drafts: torch.Tensor, banned: torch.Tensor | None, keep: list | None = None
) -> torch.Tensor:
    """Verify pass: feed [y0, d_1..d_k] ([B, k+1]); return the model's argmaxes z [B, k+1].

    Commits nothing: the caller keeps 1 + accepted tokens per row. keep: a list the pass's
    logits [B, k+1, V] are appended to (for log-probabilities).
    """
    logits = forward(model, cache, torch.cat([y0[:, None], drafts], dim=1))
    if keep is not None:
        keep.append(logits)
    return greedy(logits, banned)


def accepted_lengths(drafts: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """a [B]: the longest prefix with drafts[:, i] == z[:, i]. drafts [B, k], z [B, k+1]."""
    matches = (drafts == z[:, : drafts.shape[1]]).to(torch.int32)  # [B, k]
    return matches.cumprod(dim=1).sum(dim=1)


def accept(y0: torch.Tensor, drafts: torch.Tensor, z: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
    """Apply the acceptance rule. y0 [B], drafts [B, k], z [B, k+1] (verify argmaxes).

    Returns (emitted tokens per row: y0, d_1..d_a and the bonus z_a; the bonus per row [B]).
    Accepted drafts equal z_0..z_{a-1}, so the emitted row is y0 followed by z_0..z_a.
    One host sync.
    """
    a = accepted_lengths(drafts, z)  # [B]
    rows = torch.cat([a[:, None], y0[:, None], z], dim=1).tolist()  # the one host sync
    emitted = [row[1 : row[0] + 3] for row in rows]
    bonus = z.gather(1, a[:, None].long())[:, 0]
    return emitted, bonus


def sdsat_step(
    model,
    cache: SlotCache,
    last: torch.Tensor,
    sat_ids: torch.Tensor,
    banned: torch.Tensor | None,
    draft_override=None,
    on_logits=None,
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """One draft-then-verify iteration.

    Returns (emitted tokens per row: y0, d_1..d_a, bonus; new ``last`` [B]; drafts [B, k]).
    draft_override(drafts) -> drafts replaces the SAT drafts (oracle/garbage benchmarks).
    on_logits: given the logits that decided each emitted token (see :func:`plain_step`).
    """
    y0, drafts = draft(model, cache, last, sat_ids, banned, on_logits)
    if draft_override is not None:
        drafts = draft_override(drafts)
    kept = [] if on_logits is not None else None
    z = verify(model, cache, y0, drafts, banned, kept)  # [B, k+1]
    emitted, bonus = accept(y0, drafts, z)
    if on_logits is not None:  # z_0..z_a, decided at verify positions 0..a
        on_logits(kept[0], [list(range(len(e) - 1)) for e in emitted], [e[1:] for e in emitted])
    cache.advance([len(tokens) - 1 for tokens in emitted])  # y0 and the accepted drafts
    return emitted, bonus, drafts
