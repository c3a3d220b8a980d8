"""Mean per-token log-likelihood of held-out text: how well a model still predicts real text.

The distribution is the model's next-token distribution over the standard tokens: SAT ids
(the model's own, plus any ``exclude`` names, e.g. the other model's in a comparison) are
left out of the softmax, as decoding bans them. So adding SATs (new vocabulary rows) or a
SAT adapter (it acts only where the input holds SATs) leaves the number exactly unchanged,
and any change comes from a change of the base model's own weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.load import LoadedModel


@dataclass
class LogLikelihood:
    mean: float  # mean log-probability (nats) per predicted token; higher is better
    tokens: int  # tokens predicted (each text's tokens after its first)


@torch.inference_mode()
def mean_loglik(
    loaded: LoadedModel, texts: list[str], max_tokens: int = 1024, exclude: tuple[int, ...] = ()
) -> LogLikelihood:
    """Teacher-forced log-likelihood of each text (its first ``max_tokens`` tokens), pooled."""
    if not texts:
        raise ValueError("no held-out texts to score")
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    left_out = set(exclude) | set(loaded.sat.unique_ids if loaded.sat else [])
    keep = torch.tensor([i for i in range(vocab) if i not in left_out], device=loaded.device)
    position = torch.full((vocab,), -1, dtype=torch.long, device=loaded.device)
    position[keep] = torch.arange(len(keep), device=loaded.device)  # vocabulary id -> column kept
    total, count = 0.0, 0
    for text in texts:
        ids = loaded.tokenizer.encode(text)[:max_tokens]
        if len(ids) < 2:
            continue
        ids_t = torch.tensor(ids, device=loaded.device)
        logits = loaded.model(ids_t[None]).logits[0, :-1]  # [n-1, vocab]
        logprobs = torch.log_softmax(logits.index_select(1, keep).float(), dim=-1)  # [n-1, standard tokens]
        targets = position[ids_t[1:]]
        if bool((targets < 0).any()):
            raise ValueError("a held-out text contains a SAT token")
        total += float(logprobs.gather(1, targets[:, None]).sum())
        count += len(ids) - 1
    if not count:
        raise ValueError("every held-out text is shorter than two tokens")
    return LogLikelihood(mean=total / count, tokens=count)
