"""Log-probabilities of the tokens a decoder emits, from the logits that chose them.

Opt-in per sequence: ``Sequence.logprobs = N`` asks for each emitted token's log-probability
and the N most likely tokens at its position; ``Sequence.prompt_logprobs = N`` the same for
the prompt's tokens, from the prefill. A decode pass hands its logits to a
:class:`LogprobTap` with, per row, the positions whose logits decided the emitted tokens (the
accepted path of a verify pass, the root of a plain step); only rows that asked are
log-softmaxed. The values are the model's own distribution over standard tokens (SATs
excluded), before temperature, top-p or penalties: what a plain forward pass gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_PROMPT_ROWS = 256  # prompt positions projected to the vocabulary at once (bounds memory)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the N most likely tokens and their log-probabilities, best first


def log_softmax(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """fp32 log-softmax over the vocabulary with ``banned`` ids (the SATs) excluded. [R, V] -> [R, V]"""
    logits = logits.float()
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: list[int], n: int, banned: torch.Tensor | None) -> list[TokenLogprob]:
    """Each token's entry; logits [R, V] holds, in row i, the logits that decided tokens[i]."""
    if not tokens:
        return []
    lp = log_softmax(logits, banned)  # [R, V]
    ids = torch.tensor(tokens, dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, ids[:, None])[:, 0].tolist()  # [R]
    top_lp, top_ids = lp.topk(n, dim=-1) if n else (lp[:, :0], lp[:, :0].long())  # [R, n]
    tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_lp.tolist())]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


class LogprobTap:
    """Collects one decode step's entries for the rows that asked for them."""

    def __init__(self, wants: list[int | None], banned: torch.Tensor | None):
        self.wants = wants  # per row: N, or None (not asked)
        self.banned = banned
        self.rows: list[list[TokenLogprob]] = [[] for _ in wants]

    @classmethod
    def for_rows(cls, sequences, banned: torch.Tensor | None) -> "LogprobTap | None":
        """A tap for these sequences, or None if none of them asked."""
        wants = [s.logprobs for s in sequences]
        return None if all(w is None for w in wants) else cls(wants, banned)

    def __call__(self, logits: torch.Tensor, nodes: list[list[int]], tokens: list[list[int]]) -> None:
        """logits [B, N, V] of one pass; per row, nodes[b][i] is where tokens[b][i] was decided."""
        for b, n in enumerate(self.wants):
            if n is not None and nodes[b]:
                index = torch.tensor(nodes[b], dtype=torch.long, device=logits.device)
                self.rows[b] += token_logprobs(logits[b].index_select(0, index), tokens[b], n, self.banned)

    def take(self, row: int, count: int) -> list[TokenLogprob]:
        """The first ``count`` entries of a row (the tokens its sequence kept)."""
        return self.rows[row][:count]


def prompt_tap(model, sequences, banned: torch.Tensor | None):
    """A prefill callback (``on_hidden``) that fills ``prompt_token_logprobs`` of the sequences
    that asked (their first token gets None: nothing predicts it); None if none asked."""
    if all(s.prompt_logprobs is None for s in sequences):
        return None
    for seq in sequences:
        if seq.prompt_logprobs is not None:
            seq.prompt_token_logprobs = [None]

    def on_hidden(hidden: torch.Tensor) -> None:  # [B, W, H]: hidden states of prompt[:-1], right-padded
        head = model.get_output_embeddings()
        for b, seq in enumerate(sequences):
            if seq.prompt_logprobs is None:
                continue
            prompt = seq.prompt_ids
            for start in range(0, len(prompt) - 1, _PROMPT_ROWS):
                stop = min(start + _PROMPT_ROWS, len(prompt) - 1)
                logits = head(hidden[b, start:stop])  # [rows, V]
                seq.prompt_token_logprobs += token_logprobs(logits, prompt[start + 1 : stop + 1], seq.prompt_logprobs, banned)

    return on_hidden
