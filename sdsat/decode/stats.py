"""Per-request decoding statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class DecodeStats:
    num_sat: int = 0  # largest k used for this request (0: plain decoding)
    iterations: int = 0  # decode iterations (a draft+verify pair, or one plain step)
    forward_passes: int = 0  # decode passes this request took part in (prefill not counted)
    drafted: int = 0  # drafts offered for verification
    accepted_per_offset: list[int] = field(default_factory=list)  # [k]: accepted drafts at offset i+1
    drafted_per_offset: list[int] = field(default_factory=list)  # [k]: drafts offered at offset i+1
    new_tokens: int = 0  # tokens emitted
    prefill_s: float = 0.0
    forward_s: float = 0.0  # time in decode passes (shared with the batch)
    decode_s: float = 0.0  # wall time of the decode iterations

    def record_drafts(self, k: int, accepted: int, nodes: int | None = None) -> None:
        """A verified draft tree k deep (``nodes`` drafts in all; default k: a chain), of which
        the first ``accepted`` offsets were accepted."""
        if len(self.drafted_per_offset) < k:
            grow = k - len(self.drafted_per_offset)
            self.drafted_per_offset += [0] * grow
            self.accepted_per_offset += [0] * grow
        for i in range(k):
            self.drafted_per_offset[i] += 1
        for i in range(accepted):
            self.accepted_per_offset[i] += 1
        self.drafted += k if nodes is None else nodes
        self.num_sat = max(self.num_sat, k)

    def add(self, other: "DecodeStats") -> None:
        """Accumulate another request's counts (for totals over a benchmark)."""
        for name in ("iterations", "forward_passes", "drafted", "new_tokens", "prefill_s", "forward_s", "decode_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        grow = len(other.drafted_per_offset) - len(self.drafted_per_offset)
        if grow > 0:
            self.drafted_per_offset += [0] * grow
            self.accepted_per_offset += [0] * grow
        for i, (a, d) in enumerate(zip(other.accepted_per_offset, other.drafted_per_offset)):
            self.accepted_per_offset[i] += a
            self.drafted_per_offset[i] += d
        self.num_sat = max(self.num_sat, other.num_sat)

    @property
    def accepted(self) -> int:
        return sum(self.accepted_per_offset)

    @property
    def tau(self) -> float:
        """Mean accepted length: new tokens per iteration."""
        return self.new_tokens / self.iterations if self.iterations else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forward_passes if self.forward_passes else 0.0

    @property
    def accept_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def accept_rate_per_offset(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_offset, self.drafted_per_offset)]

    @property
    def overhead_fraction(self) -> float:
        """Share of decode wall time spent outside model passes."""
        return max(0.0, 1.0 - self.forward_s / self.decode_s) if self.decode_s else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            accepted=self.accepted,
            tau=self.tau,
            tokens_per_forward=self.tokens_per_forward,
            accept_rate=self.accept_rate,
            accept_rate_per_offset=self.accept_rate_per_offset,
            overhead_fraction=self.overhead_fraction,
        )
        return out
