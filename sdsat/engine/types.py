"""What goes in and out of the serving engine: configuration, requests, streamed chunks, step metrics."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..decode.draft_counts import DraftCounts

if TYPE_CHECKING:  # torch-free at run time: the HTTP router reads MAX_LOGPROBS from here
    from ..decode.logprobs import TokenLogprob

MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (as vLLM)


@dataclass
class EngineConfig:
    max_batch_size: int = 16  # rows decoding together (greedy and sampling rows share the batch)
    num_sat: int | None = None  # SATs a row may draft with; None: the model's trained k (or all its SATs), 0 without SATs
    lookup: int = 16  # prompt-lookup trie nodes a row may offer per pass (0: none); the scheduler picks how many
    calibration_budget_s: float = 8.0  # start-up measurement of pass costs (0: never draft)
    kernel_choice: bool = True  # CPU bf16: measure ATen, oneDNN and packed oneDNN per pass width at start-up (~8 s) and use the fastest
    max_new_tokens_limit: int = 2048
    max_queue: int = 256  # requests waiting beyond this are refused with EngineOverloaded
    kv_budget_bytes: int | None = None  # KV-cache bytes admission may fill (None: 90% of free GPU memory; CPU: no limit)

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.num_sat is not None and self.num_sat < 0:
            raise ValueError(f"num_sat must be >= 0, got {self.num_sat}")
        if self.max_new_tokens_limit < 1:
            raise ValueError(f"max_new_tokens_limit must be >= 1, got {self.max_new_tokens_limit}")
        if self.lookup < 0:
            raise ValueError(f"lookup must be >= 0, got {self.lookup}")
        if self.calibration_budget_s < 0:
            raise ValueError(f"calibration_budget_s must be >= 0, got {self.calibration_budget_s}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes <= 0:
            raise ValueError(f"kv_budget_bytes must be > 0, got {self.kv_budget_bytes}")


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    num_sat: int | None = None  # cap on k for this request; 0 = no drafting; None = the engine's
    temperature: float = 0.0  # 0: greedy; > 0: sampling (both verify SDSAT drafts)
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0  # keep the k most likely tokens when sampling (0: all)
    presence_penalty: float = 0.0  # OpenAI's penalties over the tokens generated so far
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # N: each output token's log-probability and the top N (None: not asked)
    prompt_logprobs: int | None = None  # N: the same for the prompt's tokens, from the prefill
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self):
        if self.stop is None:
            self.stop = ()
        elif isinstance(self.stop, str):
            self.stop = (self.stop,)
        elif isinstance(self.stop, list):
            self.stop = tuple(self.stop)


@dataclass
class Chunk:
    token_ids: list[int]  # new tokens in this chunk
    text: str  # new text: never a stop string or what follows it; never half a character
    finish_reason: str | None  # None until the last chunk: "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0  # running count
    stats: dict | None = None  # last chunk: DecodeStats.to_dict() + {"mode": "sdsat" | "plain" | "sampling"}
    logprobs: list[TokenLogprob] | None = None  # Request.logprobs: one per token in token_ids
    prompt_logprobs: list[TokenLogprob | None] | None = None  # Request.prompt_logprobs: on the first chunk


@dataclass
class StepMetrics:
    batch_size: int
    k: int  # SAT positions of the longest draft block in this step (0: none)
    step_s: float
    new_tokens: int
    drafts: DraftCounts  # drafts verified and accepted, per source ("sat", "lookup") and position
    queue_length: int
    width: int = 1  # query tokens per row (1: a plain step)


class EngineError(RuntimeError):
    """A failure inside the engine while serving this request."""


class EngineOverloaded(EngineError):
    """The engine's queue is full: retry later or elsewhere."""
