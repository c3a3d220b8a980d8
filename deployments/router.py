"""``Router``: the FastAPI ingress with OpenAI-compatible routes, in front of ``SDSATServer``.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health.
Bodies are validated here (pydantic, OpenAI error shapes); prompts are tokenized and checked
against the model by the model replica, whose first streamed item says whether it took the
request. A request with several prompts or ``n`` > 1 becomes one replica call per choice, made
together (choice index = prompt index x n + sample index). Streaming answers are server-sent
events ending with ``data: [DONE]``. Fields the server does not implement: :mod:`deployments.fields`.
"""

import asyncio
import logging
import uuid
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import auth, errors, fields, stream
from deployments.errors import APIError
from deployments.responses import Collected, Formatter
from deployments.schemas import ChatCompletionRequest, CompletionRequest, GenerationParams, ModelCard, ModelList

log = logging.getLogger("ray.serve")

app = FastAPI(title="SDSAT", description="OpenAI-compatible speculative decoding with semantic adaptive tokens.")
errors.install(app)
app.middleware("http")(auth.authenticate)


@dataclass
class RouterSettings:
    model_name: str = "sdsat-default"
    api_key: str | None = None  # None or "": no authentication
    health_timeout_s: float = 10.0
    # A request whose replica dies before anything reached the client is sent again, this many
    # times, after 0.5 s, 1 s, 2 s...: a whole non-streamed request, or a streamed one before its first item.
    replica_retries: int = 3


# The router's helpers come before its class: Serve serializes the ingress class as it is decorated.
def _choice_params(body: GenerationParams, prompt: dict, request_id: str, sample: int) -> dict:
    """Engine parameters of one choice: sample i of n samples with seed + i."""
    params = {**prompt, **body.engine_params(), "request_id": request_id}
    if body.seed is not None:
        params["seed"] = body.seed + sample
    return params


async def _all_or_none(calls: list, cleanup=None) -> list:
    """Run the calls together; if one fails, cancel the rest (and clean up the finished ones
    with ``cleanup``), then raise its error."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception()), None)
        if failed is None:
            return [t.result() for t in tasks]
        raise failed.exception()
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if cleanup is not None:
            for task in tasks:
                if not task.cancelled() and task.exception() is None:
                    cleanup(task.result())
        raise


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    def __init__(self, server: DeploymentHandle, settings: RouterSettings):
        self.server = server
        self.settings = settings
        self.info: dict | None = None
        auth.configure(settings.api_key)

    async def _model_info(self) -> dict:
        if self.info is None:
            self.info = await self.server.info.remote()
        return self.info

    @app.get("/health")
    async def health(self):
        """200 once a model replica answers; 503 before."""
        try:
            info = await asyncio.wait_for(self.server.info.remote(), self.settings.health_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            return APIError(503, f"no model replica is ready: {type(exc).__name__}", None, "not_ready").response()
        self.info = info
        return {"status": "ok", "model": info["model_name"], "num_sat": info["num_sat"]}

    @app.get("/v1/models", response_model=ModelList)
    async def models(self):
        info = await self._model_info()
        card = ModelCard(
            id=info["model_name"],
            created=info["created"],
            num_sat=info["num_sat"],
            max_tokens_limit=info["max_tokens_limit"],
            context_length=info["context_length"],
            dtype=info.get("dtype"),
        )
        return ModelList(data=[card])

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        body.check()
        fields.check(body, best_of_ok=body.n)
        prompts = [{"prompt": p} for p in body.prompts()]
        fmt = Formatter("completion", body, f"cmpl-{uuid.uuid4().hex}", len(prompts) * body.n)
        return await self._serve(body, prompts, fmt)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        body.check()
        fields.check(body)
        messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
        fmt = Formatter("chat", body, f"chatcmpl-{uuid.uuid4().hex}", body.n)
        return await self._serve(body, [{"messages": messages}], fmt)

    async def _serve(self, body: GenerationParams, prompts: list[dict], fmt: Formatter):
        if body.model != self.settings.model_name:
            message = f"The model `{body.model}` does not exist; this server serves `{self.settings.model_name}`"
            raise APIError(404, message, "model", "model_not_found")
        choices = [
            _choice_params(body, prompt, f"{fmt.request_id}-{p}-{i}", i) for p, prompt in enumerate(prompts) for i in range(body.n)
        ]
        if body.stream:
            opened = await _all_or_none([self._retrying(self._open, p) for p in choices], cleanup=lambda o: o[0].cancel())
            return StreamingResponse(stream.sse_events(opened, fmt), media_type="text/event-stream")
        return JSONResponse(fmt.final(await _all_or_none([self._retrying(self._collect, p) for p in choices])))

    async def _retrying(self, call, params: dict):
        """``call(params)``, sent again while its replica is lost before anything reached the client."""
        for attempt in range(self.settings.replica_retries + 1):
            try:
                return await call(params)
            except stream.ReplicaLost:
                if attempt == self.settings.replica_retries:
                    raise
                log.warning("request %s: model replica lost, sending it again (retry %d)", params["request_id"], attempt + 1)
                await asyncio.sleep(0.5 * 2**attempt)

    async def _open(self, params: dict):
        """Send one choice to a model replica; return its stream and first item (which says it took it)."""
        chunks = self.server.options(stream=True).generate.remote(params)
        try:
            first = await stream.next_item(chunks)
        except BaseException:
            chunks.cancel()
            raise
        if first is None or "error" in first:
            chunks.cancel()
            raise APIError.from_dict(first["error"] if first else {"message": "the model replica sent nothing"})
        return chunks, first

    async def _collect(self, params: dict) -> Collected:
        """One choice's whole non-streamed answer."""
        chunks, chunk = await self._open(params)
        collected = Collected()
        try:
            while chunk is not None:
                if "error" in chunk:
                    raise APIError.from_dict(chunk["error"])
                collected.add(chunk)
                chunk = await stream.next_item(chunks)
        finally:
            # A client that went away cancels this handler; cancel the request downstream too.
            chunks.cancel()
        return collected

