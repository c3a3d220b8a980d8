"""OpenAI-compatible request and response bodies (pydantic, validated at the HTTP edge).

Deviations from OpenAI, all documented in the field descriptions:
- ``temperature`` defaults to 0 (greedy SDSAT, the point of this server); > 0 samples.
- ``n`` must be 1; ``num_sat`` is an extra parameter; responses carry an extra ``sdsat`` field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

STRICT = ConfigDict(extra="forbid")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = Field(False, description="Send a last chunk with usage (usage is always on the final chunk here).")


class GenerationParams(BaseModel):
    """Parameters shared by completions and chat completions."""

    model_config = STRICT

    model: str = Field(description="Served model name (GET /v1/models lists it).")
    max_tokens: int | None = Field(
        None, description="Most tokens to generate; 1 .. the server's limit (null: the server's default_max_tokens)."
    )
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="0: greedy decoding with SDSAT drafting (lossless); > 0: sampling."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (sampling only).")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; generation stops before any of them.")
    seed: int | None = Field(
        None, ge=-(2**63), le=2**63 - 1, description="Random seed for sampling (a 64-bit integer; reproducible outputs)."
    )
    n: int = Field(1, description="Number of choices; only 1 is supported.")
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

    @field_validator("n")
    @classmethod
    def _single_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported, got n={value}")
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
        """What the model deployment needs besides the prompt."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop or []),
            "seed": self.seed,
            "num_sat": self.num_sat,
        }


class CompletionRequest(GenerationParams):
    max_tokens: int | None = Field(16, description="Most tokens to generate; 1 .. the server's limit (OpenAI's default 16).")
    prompt: str | list[int] | list[str] = Field(
        description="Text, a list of token ids, or a list holding one text (batches of prompts are not supported)."
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt is empty")
            if isinstance(value[0], str):
                if len(value) != 1:
                    raise ValueError(f"only one prompt per request is supported, got {len(value)}")
                value = value[0]
        if isinstance(value, str) and not value:
            raise ValueError("prompt is empty")
        return value


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "developer"] = Field(description="Who wrote this message.")
    content: str = Field(description="The message text.")
    name: str | None = Field(None, description="Optional author name (accepted, not used).")


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far; the chat template renders it.")
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens (wins when both are set).")

    @field_validator("max_completion_tokens")
    @classmethod
    def _positive_max_completion_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_completion_tokens must be at least 1, got {value}")
        return value

    def engine_params(self) -> dict:
        params = super().engine_params()
        if self.max_completion_tokens is not None:
            params["max_tokens"] = self.max_completion_tokens
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


class CompletionChoice(BaseModel):
    index: int = Field(0, description="Choice index (always 0).")
    text: str = Field(description="Generated text (the delta, when streaming).")
    logprobs: None = Field(None, description="Not supported; always null.")
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
    choices: list[CompletionChoice] = Field(description="One choice.")


class ChatDelta(BaseModel):
    role: str | None = Field(None, description="'assistant' on the first chunk.")
    content: str | None = Field(None, description="Text delta.")


class ChatMessageOut(BaseModel):
    role: str = Field("assistant", description="Always 'assistant'.")
    content: str = Field(description="The generated reply.")


class ChatChoice(BaseModel):
    index: int = Field(0, description="Choice index (always 0).")
    message: ChatMessageOut | None = Field(None, description="The reply (non-streaming).")
    delta: ChatDelta | None = Field(None, description="The reply's delta (streaming).")
    logprobs: None = Field(None, description="Not supported; always null.")
    finish_reason: str | None = Field(description='"stop", "length", or null while streaming.')


class ChatCompletionResponse(_Response):
    object: str = Field("chat.completion", description="'chat.completion' or 'chat.completion.chunk'.")
    choices: list[ChatChoice] = Field(description="One choice.")


class ModelCard(BaseModel):
    id: str = Field(description="Model name to pass as `model`.")
    object: str = Field("model", description="Object type.")
    created: int = Field(description="Unix time the server started.")
    owned_by: str = Field("sdsat", description="Owner.")
    num_sat: int = Field(description="SATs the model has (the largest num_sat a request may ask for).")
    max_tokens_limit: int = Field(description="Largest max_tokens a request may ask for.")
    context_length: int | None = Field(description="Model context length in tokens.")


class ModelList(BaseModel):
    object: str = Field("list", description="Object type.")
    data: list[ModelCard] = Field(description="The served models.")
