"""Batch generation loops: plain greedy and SDSAT greedy, as a stream or all at once."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from .batch import Batch, Sequence, StepEvent
from .gate import SatGate
from ..model.load import LoadedModel
from .tree import DraftTree, as_tree


def make_sequences(
    loaded: LoadedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    stop: tuple[str, ...] = (),
    eos: bool = True,
) -> list[Sequence]:
    """Sequences for these token-id prompts, checked against the model's context length."""
    eos_ids = frozenset(_eos_ids(loaded)) if eos else frozenset()
    limit = _context(loaded)
    fit = max_prompt_len(loaded, max_new_tokens)
    out = []
    for i, prompt in enumerate(prompts):
        if fit is not None and len(prompt) > fit:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                f"the model's context of {limit} tokens"
            )
        out.append(Sequence(list(prompt), max_new_tokens, eos_ids, tuple(stop)))
    return out


def _context(loaded: LoadedModel) -> int | None:
    return getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)


def max_prompt_len(loaded: LoadedModel, max_new_tokens: int) -> int | None:
    """The longest prompt that fits the model's context with max_new_tokens and room for a
    draft block beyond the last token (None: the context is not known)."""
    limit = _context(loaded)
    if not limit:
        return None
    return limit - max_new_tokens - (loaded.sat.num_sat if loaded.sat else 0) - 1


def stream(
    loaded: LoadedModel,
    sequences: list[Sequence],
    num_sat: int = 0,
    draft_override: Callable[[list[Sequence], torch.Tensor], torch.Tensor] | None = None,
    tree: DraftTree | str | None = None,
    fused: bool = False,
    lookup: int = 0,
    lookup_first: bool = False,
    gate: SatGate | None = None,
) -> Iterator[list[StepEvent]]:
    """Decode these sequences together; yield, per iteration, the tokens each row accepted.

    num_sat = 0 is plain greedy decoding; k > 0 is SDSAT with k SATs per draft.
    tree: a draft tree (or its spec, e.g. "2,2,1,1,1") to verify instead of the chain of
    top-1 drafts (see sdsat/decode/tree.py); None: the chain. Its depth (at most k) is the number
    of SATs each draft pass uses.
    fused: verify the drafts and draft the next ones in one pass (sdsat/decode/fused.py), with up to
    ``lookup`` prompt-lookup drafts verified beside the SAT drafts (0: none); lookup_first:
    a pass where every row has lookup drafts runs no SAT draft block. gate: a
    :class:`sdsat.decode.gate.SatGate` that decides, where the block would run, whether it does
    (keep one across calls: it learns from every pass).
    """
    if lookup and not fused:
        raise ValueError("lookup drafts need fused=True")
    if lookup < 0:
        raise ValueError(f"lookup must be >= 0, got {lookup}")
    sat_ids = loaded.require_sat(num_sat)
    tree = as_tree(tree)
    if tree is not None:
        if tree.depth > num_sat:
            raise ValueError(f"tree {tree.spec!r} has depth {tree.depth}: it needs num_sat >= {tree.depth}, got {num_sat}")
        sat_ids = sat_ids[: tree.depth]
    banned = loaded.sat.unique_ids if loaded.sat else []
    batch = Batch(loaded.model, loaded.tokenizer, banned_ids=banned, pad_id=loaded.tokenizer.pad_token_id or 0, gate=gate)
    batch.add(sequences)
    while len(batch):
        yield batch.step(sat_ids, draft_override, tree, fused=fused, lookup=lookup, lookup_first=lookup_first)


def generate(
    loaded: LoadedModel,
    sequences: list[Sequence],
    num_sat: int = 0,
    draft_override: Callable[[list[Sequence], torch.Tensor], torch.Tensor] | None = None,
    tree: DraftTree | str | None = None,
    fused: bool = False,
    lookup: int = 0,
    lookup_first: bool = False,
    gate: SatGate | None = None,
) -> list[Sequence]:
    """Decode to the end and return the sequences (output_ids, finish_reason, stats)."""
    for _ in stream(loaded, sequences, num_sat, draft_override, tree, fused, lookup, lookup_first, gate):
        pass
    return sequences


def oracle_drafts(
    references: dict[int, list[int]],
    *,
    wrong: bool = False,
    vocab_size: int = 0,
    regenerate: Callable[[Sequence], list[int]] | None = None,
):
    """A draft_override that drafts the known continuation (or, with wrong=True, never it).

    references: seq_id -> the full greedy output of that sequence (e.g. from a plain run).
    At a draft pass the row has n output tokens; y0 is token n, so draft i is token n+i.
    regenerate(seq): the plain greedy continuation of seq's prompt and output so far. Given,
    it replaces a reference the row has left (in bf16 a multi-token pass can flip a near-tie,
    after which the plain run is no longer this decoder's continuation). The time it takes
    is kept in ``override.seconds`` so benchmarks can leave it out.
    """

    def override(sequences: list[Sequence], drafts: torch.Tensor) -> torch.Tensor:
        k = drafts.shape[1]
        rows = []
        for seq in sequences:
            ref = references[seq.seq_id]
            n = len(seq.output_ids)
            if regenerate is not None and ref[:n] != seq.output_ids:
                start = time.perf_counter()
                ref = references[seq.seq_id] = seq.output_ids + regenerate(seq)
                override.seconds += time.perf_counter() - start
            row = ref[n + 1 : n + 1 + k]
            row = row + [0] * (k - len(row))
            if wrong:
                row = [(t + 1) % vocab_size for t in row]
            rows.append(row)
        return torch.tensor(rows, dtype=drafts.dtype, device=drafts.device)

    override.seconds = 0.0
    return override


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids = set()
    for source in (loaded.model.generation_config, loaded.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids
