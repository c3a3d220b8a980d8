"""``SDSATServer``: the model deployment. One ``Engine`` per replica; tokens stream back.

The router calls ``generate`` (one choice) through ``handle.options(stream=True)``; it yields
plain dicts: ``{"error": {...}}`` (first and only item, for a bad request or an engine failure)
or a chunk (``token_ids``, ``text`` delta, ``finish_reason``, token counts, ``stats`` on the
last one; ``logprobs`` when asked: per token [text, logprob, [[text, logprob], ...top]]; with
echo, ``prompt`` on the first: {"text", "logprobs"}). Closing the stream (the client went
away) closes the engine's iterator, which cancels the request in the engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from ray import serve

from deployments.metrics import ServerMetrics
from sdsat.decode.compiled import compile_decode
from sdsat.engine.engine import Engine, EngineConfig, EngineOverloaded, Request
from sdsat.model.load import LoadedModel, load_model
from sdsat.model.sat import SATConfig

log = logging.getLogger("ray.serve")

UNTRAINED_SAT = 4  # SATs added to a model that has none (drafts then rarely get accepted)
SHUTDOWN_WAIT_S = 30.0  # how long the shutdown hook waits for the engine's current step


@dataclass
class ServerSettings:
    """What one model replica loads and how its engine batches (internal; see AppArgs)."""

    model: str = "default"  # "default", a checkpoint directory, or a Hugging Face id
    model_name: str = "sdsat-default"  # the name clients pass as `model`
    dtype: str = "bfloat16"
    num_sat: int | None = None  # k cap (None: all of the model's SATs)
    max_batch_size: int = 16
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256  # chat requests without max_tokens
    max_queue: int = 256
    lookup: int = 16
    calibration_budget_s: float = 8.0
    kernel_choice: bool = True  # CPU bf16: the faster of oneDNN and ATen per pass width (sdsat/decode/kernels.py)
    gpus: float = 0  # GPUs reserved per replica: > 0 loads the model on CUDA, 0 on the CPU
    kv_cache_gb: float | None = None  # KV-cache budget for admission (None: 90% of free GPU memory; CPU: none)
    compile: bool = False  # torch.compile the decode step (sdsat/decode/compiled.py)
    torch_threads: int | None = None  # None: the process's (Ray sets OMP_NUM_THREADS from the replica's CPUs)


def replica_device(gpus: float) -> str:
    """The device a replica with this GPU reservation loads its model on."""
    if not gpus:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"this replica reserved {gpus:g} GPU(s) but sees no CUDA device (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): check the node's NVIDIA driver and that torch is a CUDA build"
        )
    return "cuda"


def find_default_export() -> Path | None:
    """The fine-tuned default model, if one was exported; else None.

    Looked for, in order: $SDSAT_DEFAULT_EXPORT, ``<sdsat cache>/exports/default``, then
    ``<repo>/exports/default`` (pass one of them as ``jobs/finetune.py``'s export_dir). A
    directory counts when it holds a checkpoint whose SATs were trained.
    """
    from sdsat.model.default_model import cache_dir

    candidates = [os.environ.get("SDSAT_DEFAULT_EXPORT")]
    candidates += [cache_dir() / "exports" / "default", Path(__file__).resolve().parent.parent / "exports" / "default"]
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        sat = SATConfig.load(path) if (path / "config.json").exists() else None
        if sat is not None and sat.num_sat_trained > 0:
            return path
    return None


def load_for_serving(settings: ServerSettings) -> LoadedModel:
    """Load the model a replica serves, with SATs (trained if it has them)."""
    device = replica_device(settings.gpus)
    name = settings.model
    if name == "default":
        export = find_default_export()
        if export is not None:
            log.info("serving the fine-tuned default model from %s", export)
            return load_model(str(export), dtype=settings.dtype, device=device)
        loaded = load_model("default", dtype=settings.dtype, device=device)  # with the shipped SAT artifact
        if loaded.sat is not None and loaded.sat.num_sat_trained:
            log.info("serving the default model with its shipped SAT artifact")
            return loaded
        log.warning(
            "no fine-tuned default export or shipped artifact found: serving the base default model "
            "with %d untrained SATs; drafts will rarely be accepted, so SDSAT will not speed it up",
            UNTRAINED_SAT,
        )
        return load_model("default", dtype=settings.dtype, device=device, add_sat=settings.num_sat or UNTRAINED_SAT)
    loaded = load_model(name, dtype=settings.dtype, device=device)
    if loaded.sat is None and settings.num_sat:
        loaded = load_model(name, dtype=settings.dtype, device=device, add_sat=settings.num_sat)
    return loaded


class RequestError(ValueError):
    """A request the model replica refuses (sent back as a 4xx)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.payload = {"status": status, "message": message, "param": param, "code": code}


@serve.deployment(name="SDSATServer")
class SDSATServer:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.loaded = load_for_serving(settings)
        if settings.compile:
            compile_decode(self.loaded.model)
        self.metrics = ServerMetrics()
        k = self.loaded.sat.num_sat if self.loaded.sat else 0
        self.num_sat = min(k, settings.num_sat) if settings.num_sat is not None else k
        config = EngineConfig(
            max_batch_size=settings.max_batch_size,
            num_sat=self.num_sat,
            lookup=settings.lookup,
            calibration_budget_s=settings.calibration_budget_s,
            kernel_choice=settings.kernel_choice,
            max_new_tokens_limit=settings.max_tokens_limit,
            max_queue=settings.max_queue,
            kv_budget_bytes=int(settings.kv_cache_gb * 2**30) if settings.kv_cache_gb else None,
        )
        self.engine = Engine(self.loaded, config, on_step=self.metrics.on_step)
        text_config = self.loaded.model.config.get_text_config()
        self.context_length = getattr(text_config, "max_position_embeddings", None)
        self.started = int(time.time())
        log.info("SDSATServer ready: %s (%s, k=%d, %s)", settings.model, self.loaded.path, self.num_sat, self.loaded.dtype)

    async def info(self) -> dict:
        """What the router needs to know about the served model (also a readiness probe)."""
        return {
            "model_name": self.settings.model_name,
            "source": self.settings.model,
            "path": self.loaded.path,
            "num_sat": self.num_sat,
            "trained_sat": bool(self.loaded.sat and self.loaded.sat.num_sat_trained),
            "max_tokens_limit": self.settings.max_tokens_limit,
            "context_length": self.context_length,
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "created": self.started,
        }

    async def stats(self) -> dict:
        """Engine snapshot and this replica's metric totals."""
        return {"engine": self.engine.snapshot(), "replica": self.metrics.snapshot(), "settings": asdict(self.settings)}

    async def generate(self, params: dict):
        """Stream one request's chunks (see the module docstring)."""
        try:
            request = self._request(params)
            self.engine.validate(request)
            echo = self._echo_text(params, request)
        except RequestError as exc:
            yield {"error": exc.payload}
            return
        except ValueError as exc:
            yield {"error": RequestError(str(exc), _param_of(str(exc), params)).payload}
            return
        finish, stats, prompt_entries = "cancelled", None, None
        scoring_only = params.get("max_tokens") == 0  # echo with max_tokens 0: one token is decoded, none returned
        try:
            async with contextlib.aclosing(self.engine.generate(request)) as chunks:
                async for chunk in chunks:
                    if chunk.finish_reason is not None:
                        finish, stats = chunk.finish_reason, chunk.stats
                    if chunk.prompt_logprobs is not None:  # the first prompt token has none
                        first = [[self._token_text(request.prompt_ids[0]), None, None]]
                        prompt_entries = first + self._entries(chunk.prompt_logprobs[1:])
                    if scoring_only and chunk.finish_reason is None:
                        continue
                    out = {
                        "token_ids": list(chunk.token_ids),
                        "text": chunk.text,
                        "finish_reason": chunk.finish_reason,
                        "prompt_tokens": chunk.prompt_tokens,
                        "completion_tokens": chunk.completion_tokens,
                        "stats": chunk.stats,
                        "logprobs": self._entries(chunk.logprobs),
                        "prompt": None if echo is None else {"text": echo, "logprobs": prompt_entries},
                    }
                    echo = None
                    if scoring_only:
                        out.update(token_ids=[], text="", finish_reason="length", completion_tokens=0, logprobs=[])
                    yield out
        except EngineOverloaded as exc:
            finish = "overloaded"
            yield {"error": {"status": 503, "message": f"server overloaded: {exc}", "param": None, "code": "overloaded"}}
        except Exception as exc:  # noqa: BLE001 - one request fails, the replica goes on serving
            finish = "error"
            log.exception("request %s failed in the engine", request.request_id)
            message = f"generation failed: {type(exc).__name__}: {exc}"
            yield {"error": {"status": 500, "message": message, "param": None, "code": "engine_error"}}
        finally:
            self.metrics.on_finish(finish, stats)

    def _echo_text(self, params: dict, request: Request) -> str | None:
        """The prompt's text, which an echo request returns before its completion (else None)."""
        if not params.get("echo"):
            return None
        prompt = params["prompt"]
        return prompt if isinstance(prompt, str) else self.loaded.tokenizer.decode(request.prompt_ids)

    def _entries(self, logprobs) -> list[list] | None:
        """TokenLogprobs as [text, logprob, [[text, logprob], ...]] (None stays None)."""
        if logprobs is None:
            return None
        text = self._token_text
        return [[text(e.token_id), e.logprob, [[text(t), lp] for t, lp in e.top]] for e in logprobs]

    def _token_text(self, token_id: int) -> str:
        return self.loaded.tokenizer.decode([token_id])

    def _request(self, params: dict) -> Request:
        tokenizer = self.loaded.tokenizer
        if params.get("messages") is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise RequestError("this model has no chat template: use /v1/completions", "messages")
            text = tokenizer.apply_chat_template(params["messages"], add_generation_prompt=True, tokenize=False)
            prompt_ids, prompt_param = tokenizer.encode(text, add_special_tokens=False), "messages"
        elif isinstance(params.get("prompt"), str):
            prompt_ids, prompt_param = tokenizer.encode(params["prompt"]), "prompt"
        else:
            prompt_ids, prompt_param = list(params.get("prompt") or []), "prompt"
            vocab = self.loaded.model.get_input_embeddings().weight.shape[0]
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}", "prompt")
        if not prompt_ids:
            raise RequestError("prompt is empty after tokenization", prompt_param)
        max_tokens = params.get("max_tokens")
        if max_tokens == 0:
            if not params.get("echo"):
                raise RequestError("max_tokens must be at least 1 (0 only with echo)", "max_tokens")
            max_tokens = 1  # decode one token for the engine, return none
        if max_tokens is None:
            max_tokens = self.settings.default_max_tokens
            if self.context_length:
                max_tokens = max(1, min(max_tokens, self.context_length - len(prompt_ids) - self.num_sat - 1))
        limit = self.settings.max_tokens_limit
        if not 1 <= max_tokens <= limit:
            raise RequestError(f"max_tokens must be between 1 and {limit}, got {max_tokens}", "max_tokens")
        num_sat = params.get("num_sat")
        if num_sat is not None and not 0 <= num_sat <= self.num_sat:
            raise RequestError(f"num_sat must be between 0 and {self.num_sat} (this model's k), got {num_sat}", "num_sat")
        need = len(prompt_ids) + max_tokens + self.num_sat + 1
        if self.context_length and need > self.context_length:
            raise RequestError(
                f"this model's context is {self.context_length} tokens; the {prompt_param} has {len(prompt_ids)} tokens "
                f"and max_tokens is {max_tokens} ({need} with drafting room): shorten the {prompt_param} or max_tokens",
                prompt_param,
                "context_length_exceeded",
            )
        return Request(
            prompt_ids=prompt_ids,
            max_new_tokens=max_tokens,
            stop=tuple(params.get("stop") or ()),
            num_sat=num_sat,
            temperature=params.get("temperature", 0.0),
            top_p=params.get("top_p", 1.0),
            seed=params.get("seed"),
            top_k=max(0, params.get("top_k") or 0),
            presence_penalty=params.get("presence_penalty") or 0.0,
            frequency_penalty=params.get("frequency_penalty") or 0.0,
            logprobs=params.get("logprobs"),
            prompt_logprobs=params.get("logprobs") if params.get("echo") else None,
            request_id=params.get("request_id") or f"req-{time.monotonic_ns()}",
        )

    def __del__(self):
        """Serve's shutdown hook (Serve calls it when it stops the replica; the garbage
        collector may too): stop the engine thread. Synchronous, so that either caller runs it
        to the end (an ``async def __del__`` would be a coroutine nobody awaits when collected)."""
        engine = getattr(self, "engine", None)  # absent if __init__ failed
        if engine is None:
            return
        if engine.stop(timeout_s=SHUTDOWN_WAIT_S):
            log.info("SDSATServer shut down: engine stopped")
        else:
            log.warning("SDSATServer shut down: the engine thread is still in a step after %.0f s", SHUTDOWN_WAIT_S)


def _param_of(message: str, params: dict) -> str | None:
    """Which request parameter an engine validation message is about, if it says."""
    for name, param in (("max_new_tokens", "max_tokens"), ("num_sat", "num_sat"), ("temperature", "temperature"),
                        ("top_p", "top_p"), ("stop", "stop"), ("seed", "seed"), ("logprobs", "logprobs")):
        if name in message:
            return param
    return "messages" if params.get("messages") is not None else "prompt"
