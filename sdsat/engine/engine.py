"""The serving engine: one model, many concurrent requests, shared decode steps.

Requests arrive through :meth:`Engine.generate` (an async iterator of :class:`Chunk`) from
any event loop. One background thread (:mod:`sdsat.engine.loop`) owns the model: requests
join its batch between steps and leave when finished or cancelled. Greedy and sampling
requests share its passes: the fused decoder, its drafts chosen per row by the scheduler
(sampling rows accept them by speculative sampling's exact rule). The engine is plain Python
and torch; serving frameworks only wire it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable

import torch

from .loop import ActiveRequest, DecodeLoop, Inbox
from .types import MAX_LOGPROBS, Chunk, EngineConfig, EngineError, EngineOverloaded, Request, StepMetrics
from ..decode.generate import make_sequences
from ..decode.kernels import KernelChoice, choose_kernels
from ..decode.scheduler import Scheduler
from ..model.load import LoadedModel
from ..decode.target import SamplingParams
from .text_stream import TextStream

__all__ = ["Chunk", "Engine", "EngineConfig", "EngineError", "EngineOverloaded", "Request", "StepMetrics"]


class Engine:
    """Batches the requests it holds into shared draft/verify steps.

    on_step(metrics) is called in the engine thread after every step. scheduler: the draft
    scheduler to use (default: one on pass costs measured at start-up, while serving). Call
    :meth:`shutdown` when done: the engine thread runs until then.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        on_step: Callable[[StepMetrics], None] | None = None,
        scheduler: Scheduler | None = None,
    ):
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.model_sats = loaded.sat.num_sat if loaded.sat else 0
        self.num_sat = self._default_k()
        self.context = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
        self.vocab_size = loaded.model.get_input_embeddings().weight.shape[0]
        self.sat_ids = set(loaded.sat.sat_ids) if loaded.sat else set()
        # Before the engine thread starts: every pass, plain or drafting, then runs on the faster CPU kernel.
        self.kernels = choose_kernels(loaded) if self.config.kernel_choice else KernelChoice(reason="kernel_choice off")
        self._inbox = Inbox(self.config.max_queue)
        self._loop = DecodeLoop(loaded, self.config, self.num_sat, self._inbox, on_step, scheduler)
        self._thread = threading.Thread(target=self._loop.run, name="sdsat-engine", daemon=True)
        self._thread.start()

    def _default_k(self) -> int:
        sat = self.loaded.sat
        if self.config.num_sat is None:
            return (sat.num_sat_trained or sat.num_sat) if sat else 0
        if self.config.num_sat > self.model_sats:
            raise ValueError(
                f"num_sat={self.config.num_sat} but model {self.loaded.source!r} has {self.model_sats} SATs"
            )
        return self.config.num_sat

    def validate(self, request: Request) -> None:
        """Raise ValueError naming the problem if the engine cannot serve this request."""
        prompt, limit = request.prompt_ids, self.config.max_new_tokens_limit
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("prompt is empty: give at least one token")
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab_size or t in self.sat_ids]
        if bad:
            raise ValueError(f"prompt has invalid token ids {bad[:5]} (vocabulary: 0..{self.vocab_size - 1}, SATs excluded)")
        n = request.max_new_tokens
        if not isinstance(n, int) or not 1 <= n <= limit:
            raise ValueError(f"max_new_tokens must be an integer in 1..{limit}, got {n!r}")
        margin = self.model_sats + 1  # room for a draft block beyond the last token
        if self.context and len(prompt) + n + margin > self.context:
            raise ValueError(
                f"prompt has {len(prompt)} tokens; with max_new_tokens={n} it exceeds the model's context "
                f"of {self.context} tokens (at most {self.context - margin - len(prompt)} new tokens fit)"
            )
        self._loop.kv.check_alone(self._loop.kv.row_tokens(len(prompt), n))
        k = request.num_sat
        if k is not None and (not isinstance(k, int) or not 0 <= k <= self.model_sats):
            raise ValueError(f"num_sat must be an integer in 0..{self.model_sats} (this model's SATs), got {k!r}")
        if not isinstance(request.temperature, (int, float)) or not request.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {request.temperature!r}")
        if not isinstance(request.top_p, (int, float)) or not 0 < request.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {request.top_p!r}")
        if request.seed is not None and not isinstance(request.seed, int):
            raise ValueError(f"seed must be an integer, got {request.seed!r}")
        if any(not isinstance(s, str) or not s for s in request.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {request.stop!r}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(request, name)
            if n is not None and (not isinstance(n, int) or not 0 <= n <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in 0..{MAX_LOGPROBS} or None, got {n!r}")

    async def generate(self, request: Request) -> AsyncIterator[Chunk]:
        """Validate, queue and stream one request. Leaving the iteration early (aclose, a
        cancelled task, a client gone) cancels it: its row leaves at the next step boundary.
        Raises ValueError (bad request), EngineOverloaded (queue full) or EngineError."""
        active = self._submit(request, asyncio.get_running_loop())
        try:
            while True:
                item = await active.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not active.done and self._inbox.withdraw(active, ""):
                active.done = True

    def _submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> ActiveRequest:
        self.validate(request)
        sampling = None  # greedy: the argmax of the raw logits
        if request.temperature > 0 or request.presence_penalty or request.frequency_penalty:
            sampling = SamplingParams(
                request.temperature, request.top_p, request.seed, request.top_k,
                request.presence_penalty, request.frequency_penalty,
            )
        seq = make_sequences(self.loaded, [list(request.prompt_ids)], request.max_new_tokens, stop=request.stop)[0]
        seq.num_sat = request.num_sat
        seq.logprobs, seq.prompt_logprobs = request.logprobs, request.prompt_logprobs
        active = ActiveRequest(request.request_id, seq, sampling, loop, asyncio.Queue(), TextStream(self.loaded.tokenizer))
        self._inbox.submit(active)
        return active

    def cancel(self, request_id: str) -> bool:
        """Cancel a request by id: its iterator ends with finish_reason "cancelled". False if unknown."""
        active = self._inbox.find(request_id)
        if active is None or active.done:
            return False
        if self._inbox.withdraw(active, "cancelled"):  # still queued: end it here
            self._inbox.forget(active)
            active.sequence.finish_reason = "cancelled"
            active.push(Chunk([], "", "cancelled", prompt_tokens=len(active.sequence.prompt_ids)))
        return True

    def snapshot(self) -> dict:
        """Running and queued requests, batch size, current k and totals."""
        loop = self._loop
        with self._inbox.lock:
            queued = len(self._inbox.pending)
            totals = dict(self._inbox.totals)
        out = {
            "running": len(loop.running),
            "queued": queued,
            "batch_size": len(loop.batch),
            "sampling_rows": len(loop.batch.samplers),
            "width": loop.width,
            "drafting": loop.drafting,
            "num_sat": self.num_sat,
            "lookup": self.config.lookup,
            "calibration_s": loop.calibration_s,
            "torch_threads": torch.get_num_threads(),
            "kernels": {"aten_max_tokens": self.kernels.aten_max_tokens, "packed": self.kernels.packed, "reason": self.kernels.reason},
            "scheduler": loop.scheduler.snapshot() if loop.scheduler is not None else None,
            "pass_cost": loop.scheduler.cost.ratios() if loop.scheduler is not None else None,
            "totals": totals,
        }
        return out

    async def shutdown(self) -> None:
        """Stop the decode loop; requests still queued or running fail with EngineError."""
        await asyncio.to_thread(self.stop)

    def stop(self, timeout_s: float | None = None) -> bool:
        """:meth:`shutdown` for callers without an event loop: waits (up to timeout_s) for the
        engine thread, which ends after its current step. True once it has ended."""
        self._inbox.stop()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()
