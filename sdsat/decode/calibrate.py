"""Start-up calibration of adaptive k: time plain and drafting steps before serving traffic.

For one batch size per bucket (1, 2, 4, ..., max_batch_size) a throwaway batch of dummy
rows (a prompt of typical length) takes one warm-up step of each kind (the first call of a
path costs more), then ``repeats`` rounds of a plain step, a k = 1 step and a k = k_max
step; the median time of each kind goes into :class:`sdsat.decode.adaptive.AdaptiveK`'s table (no
acceptance: dummy drafts say nothing about real ones). Without it, the first requests at
each batch size would pay for these measurements, and a single noisy first sample could
pick the wrong k.
"""

from __future__ import annotations

import logging
import statistics
import time

from .adaptive import AdaptiveK, calibration_sizes
from .batch import Batch
from .generate import make_sequences, max_prompt_len
from ..model.load import LoadedModel

log = logging.getLogger(__name__)

PROMPT_TEXT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def calibrate(
    loaded: LoadedModel,
    adaptive: AdaptiveK,
    max_batch_size: int,
    *,
    banned: list[int],
    pad_id: int,
    repeats: int = 3,
    prompt_len: int = 128,
    fused: bool = False,
    lookup: int = 0,
    lookup_first: bool = False,
) -> float:
    """Fill ``adaptive``'s time table; return the seconds it took. fused, lookup, lookup_first:
    time the fused iteration (the dummy prompt repeats itself, so lookup drafts are as long as
    they get)."""
    start = time.perf_counter()
    if adaptive.k_max == 0:
        return 0.0
    ks = sorted({0, 1, adaptive.k_max})
    new_tokens = (1 + repeats) * sum(max(k, lookup) + 2 for k in ks)  # an upper bound on what the rounds emit
    prompt = _prompt_ids(loaded, prompt_len, new_tokens)
    for size in calibration_sizes(max_batch_size):
        batch = Batch(loaded.model, loaded.tokenizer, banned_ids=banned, pad_id=pad_id)
        # no EOS and no stop strings: every row stays for every round
        batch.add(make_sequences(loaded, [prompt] * size, new_tokens, eos=False))
        samples: dict[int, list[float]] = {k: [] for k in ks}
        for round_ in range(1 + repeats):  # round 0 warms each path up and is not timed
            for k in ks:
                t0 = time.perf_counter()
                batch.step(loaded.require_sat(k), fused=fused, lookup=lookup if k else 0, lookup_first=lookup_first)
                if round_:
                    samples[k].append(time.perf_counter() - t0)
        for k, times in samples.items():
            adaptive.set_time(size, k, statistics.median(times))
    elapsed = time.perf_counter() - start
    log.info("adaptive k calibrated for batch sizes up to %d in %.1f s", max_batch_size, elapsed)
    return elapsed


def _prompt_ids(loaded: LoadedModel, length: int, new_tokens: int) -> list[int]:
    """A code-like prompt of ``length`` tokens (fewer if the context is short)."""
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    sat = set(loaded.sat.sat_ids) if loaded.sat else set()
    ids = [t for t in loaded.tokenizer.encode(PROMPT_TEXT) if t < vocab and t not in sat] or [1]
    fit = max_prompt_len(loaded, new_tokens)
    if fit is not None:
        length = max(1, min(length, fit))
    return (ids * (length // len(ids) + 1))[:length]
