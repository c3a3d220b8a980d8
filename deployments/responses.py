"""The model replica's chunks as OpenAI completion / chat bodies and stream events.

A replica chunk (see ``deployments/server.py``) carries, besides text and counts,
``logprobs`` (per new token: [text, logprob, [[text, logprob], ...top]]) when asked for, and
on the first chunk of an echo request ``prompt`` ({"text", "logprobs"}). One request has
several choices (prompts x n); each is one replica call and has its own index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from deployments.schemas import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    CompletionRequest,
    GenerationParams,
    SDSATInfo,
    TopLogprob,
    Usage,
)
from sdsat.decode.stats import DecodeStats


@dataclass
class Collected:
    """One choice of a whole (non-streamed) answer, gathered from its chunks."""

    text: list[str] = field(default_factory=list)
    logprobs: list[list] = field(default_factory=list)
    prompt: dict | None = None  # echo: {"text", "logprobs"}
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: dict | None = None

    def add(self, chunk: dict) -> None:
        self.text.append(chunk["text"])
        self.logprobs += chunk.get("logprobs") or []
        self.prompt = chunk.get("prompt") or self.prompt
        self.prompt_tokens = chunk["prompt_tokens"]
        self.completion_tokens = chunk["completion_tokens"]
        if chunk["finish_reason"] is not None:
            self.finish_reason = chunk["finish_reason"]
            self.stats = chunk["stats"]


def completion_logprobs(entries: list[list], offset: int = 0) -> dict:
    """OpenAI's legacy completions shape; offset: where the first token's text starts."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for text, logprob, top in entries:
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(None if top is None else {**dict(top), text: logprob})
        out.text_offset.append(offset)
        offset += len(text)
    return out.model_dump()


def chat_logprobs(entries: list[list]) -> dict:
    def one(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [ChatTokenLogprob(**one(t, lp), top_logprobs=[TopLogprob(**one(*alt)) for alt in top]) for t, lp, top in entries]
    return ChatLogprobs(content=content).model_dump()


def merged_info(stats: list[dict | None]) -> dict:
    """The ``sdsat`` field of a request: its choices' decoding statistics added up."""
    modes = {s.get("mode", "plain") for s in stats if s} or {"plain"}
    total = DecodeStats()
    names = set(DecodeStats.__dataclass_fields__)
    for s in stats:
        if s:
            total.add(DecodeStats(**{k: v for k, v in s.items() if k in names}))
    mode = modes.pop() if len(modes) == 1 else "sdsat" if "sdsat" in modes else "sampling"
    return SDSATInfo.from_stats({**total.to_dict(), "mode": mode}).model_dump()


class Formatter:
    """OpenAI response shapes for one request: kind is "completion" or "chat"."""

    def __init__(self, kind: str, body: GenerationParams, request_id: str, n_choices: int = 1):
        self.kind = kind
        self.model = body.model
        self.n = body.n
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.logprobs = body.engine_params()["logprobs"] is not None
        self.echo = isinstance(body, CompletionRequest) and body.echo
        self.request_id = request_id
        self.created = int(time.time())
        self._sent_role = [False] * n_choices
        self._offset = [0] * n_choices  # characters streamed per choice (text_offset base)
        self._last = [{} for _ in range(n_choices)]  # per choice: its last chunk (usage, stats)

    def _envelope(self, streaming: bool) -> dict:
        if self.kind == "chat":
            kind = "chat.completion.chunk" if streaming else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, index: int, text: str, entries: list[list], finish: str | None, streaming: bool, offset: int = 0) -> dict:
        if self.kind == "completion":
            logprobs = completion_logprobs(entries, offset) if self.logprobs else None
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        logprobs = chat_logprobs(entries) if self.logprobs else None
        if not streaming:
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
        delta = {"content": text}
        if not self._sent_role[index]:
            delta = {"role": "assistant", **delta}
            self._sent_role[index] = True
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def _extras(self, choices: list[dict]) -> dict:
        """Usage (each prompt counted once, though it has n choices) and SDSAT statistics."""
        prompt = sum(c.get("prompt_tokens", 0) for i, c in enumerate(choices) if i % self.n == 0)
        completion = sum(c.get("completion_tokens", 0) for c in choices)
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        return {"usage": usage.model_dump(), "sdsat": merged_info([c.get("stats") for c in choices])}

    def final(self, collected: list[Collected]) -> dict:
        """The non-streamed response body."""
        choices = []
        for index, c in enumerate(collected):
            text, entries = "".join(c.text), c.logprobs
            if self.echo and c.prompt is not None:
                text, entries = c.prompt["text"] + text, (c.prompt["logprobs"] or []) + entries
            choices.append(self._choice(index, text, entries, c.finish_reason, streaming=False))
        counts = [
            {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "stats": c.stats} for c in collected
        ]
        return {**self._envelope(False), "choices": choices, **self._extras(counts)}

    def chunk_events(self, index: int, chunk: dict, last: bool) -> list[dict]:
        """Stream events for one replica chunk of choice ``index``. last: every choice has now
        finished, so the event carries the request's usage and SDSAT statistics."""
        finish, text, entries = chunk["finish_reason"], chunk["text"], chunk.get("logprobs") or []
        prompt = chunk.get("prompt") if self.echo else None
        if prompt is not None:
            text, entries = prompt["text"] + text, (prompt["logprobs"] or []) + entries
        self._last[index] = chunk
        if not text and not entries and finish is None:
            return []
        event = {**self._envelope(True), "choices": [self._choice(index, text, entries, finish, True, self._offset[index])]}
        self._offset[index] += sum(len(e[0]) for e in entries)
        if not last:
            return [event]
        extras = self._extras(self._last)
        events = [{**event, **extras}]
        if self.include_usage:
            events.append({**self._envelope(True), "choices": [], **extras})
        return events
