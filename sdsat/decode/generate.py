"""Batch generation loops: plain greedy, the scheduled fused decoder and the paper's two-step iteration, as a stream or all at once."""

from __future__ import annotations

import time
import weakref
from typing import Callable, Iterator

import torch

from .batch import Batch, Sequence, StepEvent
from .calibrate import measured_scheduler
from .scheduler import Scheduler
from .target import SamplingParams
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


DEFAULT_LOOKUP = 16  # prompt-lookup trie nodes a row may offer per pass; the scheduler picks how many
_schedulers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its measured scheduler


def default_scheduler(loaded: LoadedModel) -> Scheduler:
    """One scheduler per model, its pass costs measured on first use (a few seconds) and its
    acceptance estimates kept across calls."""
    scheduler = _schedulers.get(loaded.model)
    if scheduler is None:
        scheduler = _schedulers[loaded.model] = measured_scheduler(loaded, pad_id=_pad(loaded))
    return scheduler


def stream(
    loaded: LoadedModel,
    sequences: list[Sequence],
    num_sat: int = 0,
    draft_override: Callable[[list[Sequence], torch.Tensor], torch.Tensor] | None = None,
    tree: DraftTree | str | None = None,
    *,
    two_step: bool = False,
    lookup: int | None = None,
    scheduler: Scheduler | None = None,
    sampling: list[SamplingParams | None] | None = None,
) -> Iterator[list[StepEvent]]:
    """Decode these sequences together; yield, per iteration, the tokens each row accepted.

    The default decoder is the fused iteration (sdsat/decode/fused.py) with the drafts a
    scheduler (sdsat/decode/scheduler.py; default: :func:`default_scheduler`) chooses per
    row and pass: up to ``lookup`` prompt-lookup nodes (default 16 when num_sat > 0, else 0),
    pending SAT drafts and a draft block of up to num_sat SATs (each row's
    ``Sequence.num_sat`` caps its own). num_sat = 0 with lookup = 0 is plain greedy decoding.
    two_step: the paper's iteration at a fixed k = num_sat (a draft pass, then a verify pass);
    draft_override and tree (a draft tree or its spec, e.g. "2,2,1,1,1", depth <= k) apply
    to it only. sampling: per sequence, its :class:`SamplingParams` (None: greedy); sampling
    rows verify the same drafts (fused iteration only) and keep plain sampling's distribution.
    """
    if lookup is None:
        lookup = DEFAULT_LOOKUP if num_sat else 0
    if lookup < 0:
        raise ValueError(f"lookup must be >= 0, got {lookup}")
    sat_ids = loaded.require_sat(num_sat)
    tree = as_tree(tree)
    if tree is not None or draft_override is not None:
        two_step = True
    if two_step:
        if not num_sat:
            raise ValueError("the two-step iteration needs num_sat >= 1")
        if tree is not None:
            if tree.depth > num_sat:
                raise ValueError(f"tree {tree.spec!r} has depth {tree.depth}: it needs num_sat >= {tree.depth}, got {num_sat}")
            sat_ids = sat_ids[: tree.depth]
    drafting = not two_step and (num_sat or lookup)
    if drafting and scheduler is None:
        scheduler = default_scheduler(loaded)
    banned = loaded.sat.unique_ids if loaded.sat else []
    batch = Batch(loaded.model, loaded.tokenizer, banned_ids=banned, pad_id=_pad(loaded), scheduler=scheduler if drafting else None, closed=True)
    batch.add(sequences, sampling)
    while len(batch):
        if drafting:
            yield batch.scheduled_step(sat_ids, lookup)
        else:
            yield batch.step(sat_ids if two_step else [], draft_override, tree)


def generate(
    loaded: LoadedModel,
    sequences: list[Sequence],
    num_sat: int = 0,
    draft_override: Callable[[list[Sequence], torch.Tensor], torch.Tensor] | None = None,
    tree: DraftTree | str | None = None,
    *,
    two_step: bool = False,
    lookup: int | None = None,
    scheduler: Scheduler | None = None,
    sampling: list[SamplingParams | None] | None = None,
) -> list[Sequence]:
    """Decode to the end and return the sequences (output_ids, finish_reason, stats)."""
    steps = stream(
        loaded, sequences, num_sat, draft_override, tree, two_step=two_step, lookup=lookup, scheduler=scheduler, sampling=sampling
    )
    for _ in steps:
        pass
    return sequences


def _pad(loaded: LoadedModel) -> int:
    return getattr(loaded.tokenizer, "pad_token_id", None) or 0


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
