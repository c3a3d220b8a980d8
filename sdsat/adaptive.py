"""Adaptive k: choose the number of SATs per draft from measured speed and acceptance.

Per decode iteration, plain decoding (k = 0) yields 1 token in one pass; SDSAT with k SATs
yields E[tokens | k] = 2 + sum_{i=1..k} prod_{j<=i} p_j in two passes, where p_j is the
conditional acceptance at offset j (draft j accepted given drafts 1..j-1 were). The best k
maximises E[tokens | k] / time(iteration with k). Both factors are measured online:
iteration time as an EMA per (batch-size bucket, k), acceptance as decayed counts per offset.
All rows of a step share its time, so the per-row rate ranks k for the whole batch.
"""

from __future__ import annotations

import random


def expected_tokens(accept: list[float], k: int) -> float:
    """E[new tokens per iteration | k]: 1 for plain decoding, 2 + sum_i prod_{j<=i} p_j for SDSAT."""
    if k == 0:
        return 1.0
    total, prod = 2.0, 1.0
    for p in accept[:k]:
        prod *= p
        total += prod
    return total


def choose_k(step_seconds: dict[int, float], accept: list[float]) -> int:
    """The k with the most expected tokens per second; ties go to the smaller k.

    step_seconds: k -> time of one iteration with that k (k = 0: a plain step).
    accept: [k_max] conditional acceptance per offset.
    """
    if not step_seconds:
        raise ValueError("choose_k needs at least one measured step time")
    return max(sorted(step_seconds), key=lambda k: (expected_tokens(accept, k) / step_seconds[k], -k))


def interpolate_times(measured: dict[int, float], k_max: int) -> dict[int, float]:
    """Estimate unmeasured SDSAT k (1..k_max) linearly between measured ones (flat beyond them).

    The plain step (k = 0) is a different kind of iteration and is never interpolated.
    """
    out = dict(measured)
    known = sorted(k for k in measured if k > 0)
    if not known:
        return out
    for k in range(1, k_max + 1):
        if k in out:
            continue
        lower = [m for m in known if m < k]
        upper = [m for m in known if m > k]
        if lower and upper:
            lo, hi = lower[-1], upper[0]
            out[k] = measured[lo] + (measured[hi] - measured[lo]) * (k - lo) / (hi - lo)
        else:
            out[k] = measured[lower[-1] if lower else upper[0]]
    return out


def bucket(batch_size: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, 9-16, ... share timing estimates."""
    return max(0, (batch_size - 1).bit_length())


class AdaptiveK:
    """Online estimates and the choice of k for the next greedy step."""

    def __init__(
        self,
        k_max: int,
        *,
        time_ema: float = 0.3,
        accept_decay: float = 0.98,
        explore_every: int = 32,
        prior: tuple[float, float] = (1.0, 2.0),
        seed: int = 0,
    ):
        self.k_max = k_max
        self.time_ema = time_ema  # weight of a new step time
        self.accept_decay = accept_decay  # per observed step
        self.explore_every = explore_every  # one exploring step in this many
        self.step_seconds: dict[tuple[int, int], float] = {}  # (bucket, k) -> EMA of iteration time
        self.accepted = [prior[0]] * k_max  # decayed count of drafts accepted at offset j
        self.reached = [prior[1]] * k_max  # decayed count of drafts at offset j whose predecessors were accepted
        self.steps = 0
        self.rng = random.Random(seed)

    def acceptance(self) -> list[float]:
        """[k_max]: conditional acceptance per offset."""
        return [a / r for a, r in zip(self.accepted, self.reached)]

    def times(self, batch_size: int) -> dict[int, float]:
        b = bucket(batch_size)
        measured = {k: t for (bb, k), t in self.step_seconds.items() if bb == b}
        return interpolate_times(measured, self.k_max)

    def propose(self, batch_size: int) -> int:
        """k for the next step: measure the plain step, k = 1 and k_max first, then exploit,
        and now and then explore another k so that the estimates stay fresh."""
        if self.k_max == 0:
            return 0
        b = bucket(batch_size)
        for k in (0, 1, self.k_max):
            if (b, k) not in self.step_seconds:
                return k
        if self.explore_every and self.steps % self.explore_every == self.explore_every - 1:
            return self.rng.randint(0, self.k_max)
        return choose_k(self.times(batch_size), self.acceptance())

    def observe(self, batch_size: int, k: int, step_s: float, accepted: list[int]) -> None:
        """Record one step: its k, its time and the accepted drafts per row."""
        self.steps += 1
        key = (bucket(batch_size), k)
        old = self.step_seconds.get(key)
        self.step_seconds[key] = step_s if old is None else old + self.time_ema * (step_s - old)
        if k == 0 or not accepted:
            return
        self.accepted = [x * self.accept_decay for x in self.accepted]
        self.reached = [x * self.accept_decay for x in self.reached]
        for a in accepted:
            for j in range(min(a + 1, k)):  # offset j+1 was reached: drafts 1..j accepted
                self.reached[j] += 1
                if a > j:
                    self.accepted[j] += 1
