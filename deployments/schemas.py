"""OpenAI-compatible request and response bodies (pydantic, validated at the HTTP edge).

Deviations from OpenAI, all documented in the field descriptions:
- ``temperature`` defaults to 0 (greedy SDSAT, the point of this server); > 0 samples.
- ``num_sat`` is an extra parameter; responses carry an extra ``sdsat`` field.
- Fields this server does not know are kept aside (``model_extra``) for
  :mod:`deployments.fields`, which accepts, refuses (400) or ignores them with a warning.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.errors import APIError
from sdsat.engine.types import MAX_LOGPROBS  # most alternatives per token (completions logprobs, chat top_logprobs)

OPEN = ConfigDict(extra="allow")  # unknown fields land in model_extra (see deployments/fields.py)
MAX_CHOICES = 64  # prompts x n in one request


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, f"invalid value for {param}: {message}", param, "invalid_value")


class StreamOptions(BaseModel):
    model_config = OPEN
    include_usage: bool = Field(False, description="Send a last chunk with usage (usage is always on the final chunk here).")


class GenerationParams(BaseModel):
    """Parameters shared by completions and chat completions."""

    model_config = OPEN

    model: str = Field(description="Served model name (GET /v1/models lists it).")
    max_tokens: int | None = Field(
        None, description="Most tokens to generate; 1 .. the server's limit (null: the server's default_max_tokens)."
    )
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="0: greedy decoding with SDSAT drafting (lossless); > 0: speculative sampling with the same drafts (exact distribution)."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (sampling only).")
    top_k: int | None = Field(
        None, ge=-1, description="Extension (as vLLM): sample from the k most likely tokens only (-1, 0 or absent: all)."
    )
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; generation stops before any of them.")
    seed: int | None = Field(
        None,
        ge=-(2**63),
        le=2**63 - 1 - MAX_CHOICES,
        description="Random seed for sampling (reproducible outputs); choice i of n samples with seed + i.",
    )
    n: int = Field(1, ge=1, le=MAX_CHOICES, description=f"Choices per prompt (prompts x n at most {MAX_CHOICES}).")
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Penalty on tokens already generated (once per token), as OpenAI; applied in the target distribution drafts are verified against."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Penalty on tokens already generated (per occurrence), as OpenAI."
    )
    stream: bool = Field(False, description="Stream server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (OpenAI's include_usage).")
    user: str | None = Field(None, description="End-user id (accepted, logged nowhere).")
    num_sat: int | None = Field(
        None, ge=0, description="SDSAT extension: SATs per draft step (0 disables drafting; at most the model's k)."
    )

    @field_validator("max_tokens")
    @classmethod
    def _positive_max_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_tokens must be at least 1, got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def engine_params(self) -> dict:
        """What the model deployment needs besides the prompt (one choice)."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": list(self.stop or []),
            "seed": self.seed,
            "num_sat": self.num_sat,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }


Prompt = str | list[int]


class CompletionRequest(GenerationParams):
    max_tokens: int | None = Field(
        16, description="Most tokens to generate; 1 .. the server's limit (OpenAI's default 16); 0 only with echo."
    )
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of token ids, or a batch of either (one choice per prompt and n)."
    )
    echo: bool = Field(False, description="Return the prompt before the completion (with its logprobs if asked).")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description=f"Log-probabilities of each token and its top 0..{MAX_LOGPROBS} alternatives."
    )

    @field_validator("max_tokens")
    @classmethod
    def _positive_max_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError(f"max_tokens must be at least 0 (0 only with echo), got {value}")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value):
        batch = isinstance(value, list) and bool(value) and isinstance(value[0], (str, list))
        prompts = value if batch else [value]
        for i, prompt in enumerate(prompts):
            where = f"prompt {i}" if batch else "prompt"
            text = isinstance(prompt, str)
            ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
            if not (text or ids) or (batch and text != isinstance(prompts[0], str)):
                raise ValueError(
                    f"{where} must be a text or a list of token ids (a batch: all texts or all token-id lists), got {type(prompt).__name__}"
                )
            if not prompt:
                raise ValueError(f"{where} is empty")
        return value

    def check(self) -> None:
        """Rules that tie fields together (APIError 400 naming the field)."""
        if self.max_tokens == 0 and not self.echo:
            raise _invalid("max_tokens", "max_tokens must be at least 1 (0 only with echo)")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise _invalid("n", f"{len(self.prompts())} prompts x n={self.n} exceeds {MAX_CHOICES} choices per request")

    def prompts(self) -> list[Prompt]:
        """The prompts of this request: texts or token-id lists."""
        value = self.prompt
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            return list(value)
        return [value]

    def engine_params(self) -> dict:
        return {**super().engine_params(), "echo": self.echo, "logprobs": self.logprobs}


class ChatMessage(BaseModel):
    model_config = OPEN
    role: Literal["system", "user", "assistant", "developer"] = Field(description="Who wrote this message.")
    content: str = Field(description="The message text, or a list of text parts (joined with newlines).")
    name: str | None = Field(None, description="Optional author name (accepted, not used).")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value):
        """OpenAI's typed content: a list of {"type": "text", "text": ...} parts."""
        if not isinstance(value, list):
            return value
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} is {kind!r}: only text parts ({{'type': 'text', 'text': ...}}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far; the chat template renders it.")
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens (wins when both are set).")
    logprobs: bool = Field(False, description="Return the log-probability of each generated token.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description=f"With logprobs: also the 0..{MAX_LOGPROBS} most likely tokens at each position."
    )

    @field_validator("max_completion_tokens")
    @classmethod
    def _positive_max_completion_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_completion_tokens must be at least 1, got {value}")
        return value

    def check(self) -> None:
        """Rules that tie fields together (APIError 400 naming the field)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise _invalid("top_logprobs", "top_logprobs needs logprobs: true")

    def engine_params(self) -> dict:
        params = super().engine_params()
        if self.max_completion_tokens is not None:
            params["max_tokens"] = self.max_completion_tokens
        params["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        params["echo"] = False
        return params


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt.")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class SDSATInfo(BaseModel):
    mode: str = Field(description='"sdsat" (greedy with drafts), "plain" (greedy, no drafts) or "sampling".')
    num_sat: int = Field(0, description="Largest k used for this request.")
    drafted: int = Field(0, description="Drafts offered for verification.")
    accepted: int = Field(0, description="Drafts accepted.")
    accepted_per_offset: list[int] = Field(default_factory=list, description="Accepted drafts at offset 1..k.")
    tau: float = Field(0.0, description="Mean accepted length: new tokens per decode iteration.")
    tokens_per_forward: float = Field(0.0, description="New tokens per decode forward pass.")
    iterations: int = Field(0, description="Decode iterations.")

    @classmethod
    def from_stats(cls, stats: dict | None) -> "SDSATInfo":
        stats = {"mode": "plain", **(stats or {})}
        return cls(**{k: stats[k] for k in cls.model_fields if k in stats})


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(description="Each token's text (prompt tokens first with echo).")
    token_logprobs: list[float | None] = Field(description="Each token's log-probability (null for the first prompt token).")
    top_logprobs: list[dict[str, float] | None] = Field(description="Per token: the top `logprobs` tokens and the chosen one.")
    text_offset: list[int] = Field(description="Each token's character offset in the choice's text.")


class CompletionChoice(BaseModel):
    index: int = Field(0, description="Choice index: prompt index x n + sample index.")
    text: str = Field(description="Generated text (the delta, when streaming); the prompt first with echo.")
    logprobs: CompletionLogprobs | None = Field(None, description="With `logprobs`: the tokens' log-probabilities.")
    finish_reason: str | None = Field(description='"stop", "length", or null while streaming.')


class _Response(BaseModel):
    """Fields every completion response (or streamed chunk) carries."""

    id: str = Field(description="Request id.")
    created: int = Field(description="Unix time the request was received.")
    model: str = Field(description="Served model name.")
    usage: Usage | None = Field(None, description="Token counts (on the final chunk when streaming).")
    sdsat: SDSATInfo | None = Field(None, description="SDSAT statistics (on the final chunk when streaming).")


class CompletionResponse(_Response):
    object: str = Field("text_completion", description="Object type.")
    choices: list[CompletionChoice] = Field(description="One choice per prompt and n.")


class ChatDelta(BaseModel):
    role: str | None = Field(None, description="'assistant' on the first chunk.")
    content: str | None = Field(None, description="Text delta.")


class ChatMessageOut(BaseModel):
    role: str = Field("assistant", description="Always 'assistant'.")
    content: str = Field(description="The generated reply.")


class TopLogprob(BaseModel):
    token: str = Field(description="The token's text.")
    logprob: float = Field(description="Its log-probability under the model (before temperature and top-p).")
    bytes: list[int] = Field(description="The UTF-8 bytes of `token`.")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The `top_logprobs` most likely tokens at this position.")


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(description="One entry per generated token.")


class ChatChoice(BaseModel):
    index: int = Field(0, description="Choice index (0 .. n-1).")
    message: ChatMessageOut | None = Field(None, description="The reply (non-streaming).")
    delta: ChatDelta | None = Field(None, description="The reply's delta (streaming).")
    logprobs: ChatLogprobs | None = Field(None, description="With `logprobs`: the generated tokens' log-probabilities.")
    finish_reason: str | None = Field(description='"stop", "length", or null while streaming.')


class ChatCompletionResponse(_Response):
    object: str = Field("chat.completion", description="'chat.completion' or 'chat.completion.chunk'.")
    choices: list[ChatChoice] = Field(description="n choices.")


class ModelCard(BaseModel):
    id: str = Field(description="Model name to pass as `model`.")
    object: str = Field("model", description="Object type.")
    created: int = Field(description="Unix time the server started.")
    owned_by: str = Field("sdsat", description="Owner.")
    num_sat: int = Field(description="SATs the model has (the largest num_sat a request may ask for).")
    max_tokens_limit: int = Field(description="Largest max_tokens a request may ask for.")
    context_length: int | None = Field(description="Model context length in tokens.")
    dtype: str | None = Field(None, description="The dtype the replicas run the model in (extension; float32 makes greedy output exact).")


class ModelList(BaseModel):
    object: str = Field("list", description="Object type.")
    data: list[ModelCard] = Field(description="The served models.")
