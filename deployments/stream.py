"""The model replica's chunks as OpenAI completion / chat bodies and server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from ray.serve.exceptions import BackPressureError

from deployments.errors import APIError
from deployments.schemas import GenerationParams, SDSATInfo, Usage

log = logging.getLogger("ray.serve")


@dataclass
class Collected:
    """A whole (non-streamed) answer, gathered from its chunks."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: dict | None = None

    def add(self, chunk: dict) -> None:
        self.text.append(chunk["text"])
        self.prompt_tokens = chunk["prompt_tokens"]
        self.completion_tokens = chunk["completion_tokens"]
        if chunk["finish_reason"] is not None:
            self.finish_reason = chunk["finish_reason"]
            self.stats = chunk["stats"]


class Formatter:
    """OpenAI response shapes for one request: kind is "completion" or "chat"."""

    def __init__(self, kind: str, body: GenerationParams, request_id: str):
        self.kind = kind
        self.model = body.model
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.request_id = request_id
        self.created = int(time.time())
        self._sent_role = False

    def _envelope(self, streaming: bool) -> dict:
        if self.kind == "chat":
            kind = "chat.completion.chunk" if streaming else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, text: str, finish_reason: str | None, streaming: bool) -> dict:
        if self.kind == "completion":
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if not streaming:
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        delta = {"content": text}
        if not self._sent_role:
            delta = {"role": "assistant", **delta}
            self._sent_role = True
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    @staticmethod
    def _extras(prompt_tokens: int, completion_tokens: int, stats: dict | None) -> dict:
        usage = Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
        )
        return {"usage": usage.model_dump(), "sdsat": SDSATInfo.from_stats(stats).model_dump()}

    def final(self, collected: Collected) -> dict:
        """The non-streamed response body."""
        choice = self._choice("".join(collected.text), collected.finish_reason, streaming=False)
        extras = self._extras(collected.prompt_tokens, collected.completion_tokens, collected.stats)
        return {**self._envelope(False), "choices": [choice], **extras}

    def chunk_events(self, chunk: dict) -> list[dict]:
        """Stream events for one replica chunk; the last one carries usage and SDSAT statistics."""
        finish = chunk["finish_reason"]
        if not chunk["text"] and finish is None:
            return []
        event = {**self._envelope(True), "choices": [self._choice(chunk["text"], finish, streaming=True)]}
        if finish is None:
            return [event]
        extras = self._extras(chunk["prompt_tokens"], chunk["completion_tokens"], chunk["stats"])
        events = [{**event, **extras}]
        if self.include_usage:
            events.append({**self._envelope(True), "choices": [], **extras})
        return events


class ReplicaLost(APIError):
    """The call to the model replica failed (it died, became unreachable, or Serve could not
    deliver the request); nothing reached the client from it yet, so it may be sent again."""

    def __init__(self, exc: BaseException):
        super().__init__(503, f"the model replica failed ({type(exc).__name__}); retry", None, "replica_failed")


async def next_item(chunks) -> dict | None:
    """The next streamed item, None at the end; replica failures become OpenAI errors."""
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None
    except BackPressureError as exc:
        raise APIError(503, f"server overloaded, retry later: {exc}", None, "overloaded") from exc
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - a replica died or the call failed (the replica's own
        # errors come as error items, not exceptions): the router may send the request again
        log.warning("model replica call failed: %r", exc)
        raise ReplicaLost(exc) from exc


async def sse_events(chunks, first: dict, fmt: Formatter):
    """Server-sent events for one streamed request."""
    chunk = first
    try:
        while chunk is not None:
            if "error" in chunk:
                yield sse(APIError.from_dict(chunk["error"]).body())
                return
            for event in fmt.chunk_events(chunk):
                yield sse(event)
            chunk = await next_item(chunks)
        yield "data: [DONE]\n\n"
    except APIError as exc:
        yield sse(exc.body())
    except Exception as exc:  # noqa: BLE001 - the response has started: report in-band
        log.exception("streaming %s failed", fmt.request_id)
        yield sse(APIError(500, f"streaming failed: {type(exc).__name__}", None, "internal_error").body())
    finally:
        chunks.cancel()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
