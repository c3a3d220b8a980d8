"""Calls to the model replicas: their streamed items, the failures worth a retry, and
server-sent events merged from a request's choices."""

from __future__ import annotations

import asyncio
import json
import logging

import ray.exceptions
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from deployments.errors import APIError
from deployments.responses import Formatter

log = logging.getLogger("ray.serve")

# The replica (or its node, or its worker) went away, or Serve could not reach one: the
# request itself is not at fault, so sending it again may work. Anything else (an exception
# raised by the replica's own code, a bad request) would fail again and is never retried.
RETRYABLE = (
    ray.exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.ObjectLostError,
    ReplicaUnavailableError,
    DeploymentUnavailableError,
)


class ReplicaLost(APIError):
    """The model replica failed in a way a retry can fix (see RETRYABLE); nothing reached the
    client from it yet, so the router may send the request again."""

    def __init__(self, exc: BaseException):
        super().__init__(503, f"the model replica failed ({type(exc).__name__}); retry", None, "replica_failed")


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE) and not isinstance(exc, (ValueError, ray.exceptions.RayTaskError))


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
    except Exception as exc:  # noqa: BLE001 - the replica's own errors come as error items, not exceptions
        if retryable(exc):
            log.warning("model replica call failed (will retry): %r", exc)
            raise ReplicaLost(exc) from exc
        log.error("model replica call failed: %r", exc)
        raise APIError(500, f"the model replica failed: {type(exc).__name__}", None, "replica_error") from exc


async def merged(opened: list[tuple[object, dict]]):
    """(choice index, item) from every choice's stream as items arrive, each stream's first
    item first; ends when every stream has ended. Failures come out as exceptions."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, chunks, first: dict) -> None:
        try:
            item = first
            while item is not None:
                await queue.put((index, item))
                item = await next_item(chunks)
            await queue.put((index, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, chunks, first)) for i, (chunks, first) in enumerate(opened)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for chunks, _ in opened:
            chunks.cancel()


async def sse_events(opened: list[tuple[object, dict]], fmt: Formatter):
    """Server-sent events for one streamed request (one opened replica stream per choice)."""
    unfinished = len(opened)
    try:
        async for index, chunk in merged(opened):
            if "error" in chunk:
                yield sse(APIError.from_dict(chunk["error"]).body())
                return
            unfinished -= chunk["finish_reason"] is not None
            for event in fmt.chunk_events(index, chunk, last=unfinished == 0):
                yield sse(event)
        yield "data: [DONE]\n\n"
    except APIError as exc:
        yield sse(exc.body())
    except Exception as exc:  # noqa: BLE001 - the response has started: report in-band
        log.exception("streaming %s failed", fmt.request_id)
        yield sse(APIError(500, f"streaming failed: {type(exc).__name__}", None, "internal_error").body())


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
