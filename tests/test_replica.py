"""Replica sturdiness without a cluster: the shutdown hook stops the engine, and the router
retries only the replica failures a retry can fix."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import ray.exceptions

from deployments import stream
from deployments.errors import APIError
from deployments.router import Router, RouterSettings
from deployments.server import SDSATServer, ServerSettings
from tests.serve_utils import make_tiny_checkpoint


def test_shutdown_hook_stops_the_engine(tmp_path):
    server = SDSATServer.func_or_class(ServerSettings(model=str(make_tiny_checkpoint(tmp_path / "tiny")), dtype="float32"))
    thread = server.engine._thread
    assert thread.is_alive()
    server.__del__()  # what Serve calls when it stops the replica (a plain call: nothing to await)
    assert not thread.is_alive()
    server.__del__()  # a second call (the garbage collector's) is harmless


def _failing(exc: BaseException):
    async def chunks():
        raise exc
        yield  # noqa: unreachable - makes this an async generator

    return chunks()


@pytest.mark.parametrize(
    "exc, retried",
    [
        (ray.exceptions.ActorDiedError(), True),
        (ray.exceptions.ActorUnavailableError("gone", None), True),
        (ray.exceptions.WorkerCrashedError(), True),
        (ray.exceptions.RayTaskError("generate", "traceback", ValueError("bad input")).as_instanceof_cause(), False),
        (ray.exceptions.RayTaskError("generate", "traceback", TypeError("a bug")).as_instanceof_cause(), False),
        (RuntimeError("anything else"), False),
    ],
)
def test_only_replica_failures_are_retryable(exc, retried):
    with pytest.raises(APIError) as err:
        asyncio.run(stream.next_item(_failing(exc)))
    assert isinstance(err.value, stream.ReplicaLost) == retried
    assert err.value.status == (503 if retried else 500)


def test_router_sends_again_only_what_a_retry_can_fix():
    router = SimpleNamespace(settings=RouterSettings(replica_retries=2))  # all that _retrying reads
    retrying = Router.func_or_class._retrying
    calls = []

    def attempt(error: APIError):
        async def call(params):
            calls.append(params)
            raise error

        return call

    with pytest.raises(stream.ReplicaLost):
        asyncio.run(retrying(router, attempt(stream.ReplicaLost(ray.exceptions.ActorDiedError())), {"request_id": "a"}))
    assert len(calls) == 3  # the first try and two retries
    calls.clear()
    with pytest.raises(APIError):
        asyncio.run(retrying(router, attempt(APIError(400, "bad request", "prompt")), {"request_id": "b"}))
    assert len(calls) == 1  # a bad request is sent once
