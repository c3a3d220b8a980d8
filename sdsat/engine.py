"""The serving engine: one model, many concurrent requests, shared decode steps.

Requests arrive through :meth:`Engine.generate` (an async iterator of :class:`Chunk`) on
any event loop. One background thread owns the model and runs the decode loop, so no
torch work ever runs on an event loop thread:

1. admit queued requests while fewer than ``max_batch_size`` rows run (prefill; they join);
2. drop rows whose consumer went away (they leave between steps);
3. step the greedy batch (SDSAT with an adaptive k) and the sampling batch, alternately;
4. hand each row's new tokens and text to its request's asyncio queue.

An exception in a step fails that step's requests with :class:`EngineError` through their
iterators; the engine goes on serving later requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from .adaptive import AdaptiveK
from .batch import Batch, Sequence, StepEvent
from .engine_types import Chunk, EngineConfig, EngineError, EngineOverloaded, Request, StepMetrics
from .generate import make_sequences
from .models import LoadedModel
from .sampling import SamplingBatch, SamplingParams
from .text_stream import TextStream

__all__ = ["Chunk", "Engine", "EngineConfig", "EngineError", "EngineOverloaded", "Request", "StepMetrics"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Active:
    """A request inside the engine: its sequence and the way back to its consumer."""

    request: Request
    sequence: Sequence
    sampling: SamplingParams | None  # None: greedy
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    text: TextStream
    done: bool = False  # its last chunk or its error has been handed out (or its consumer left)

    @property
    def mode(self) -> str:
        if self.sampling is not None:
            return "sampling"
        return "sdsat" if self.sequence.stats.num_sat else "plain"


class Engine:
    """Batches the requests it holds into shared draft/verify (or sampling) steps."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        on_step: Callable[[StepMetrics], None] | None = None,
    ):
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.on_step = on_step  # called in the engine thread after every step
        self.model_sats = loaded.sat.num_sat if loaded.sat else 0
        self.num_sat = self._default_k()
        self.context = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
        self.vocab_size = loaded.model.get_input_embeddings().weight.shape[0]
        self.sat_ids = set(loaded.sat.sat_ids) if loaded.sat else set()
        self._banned = loaded.sat.unique_ids if loaded.sat else []
        self._pad_id = getattr(loaded.tokenizer, "pad_token_id", None) or 0
        self._greedy = Batch(loaded.model, loaded.tokenizer, self._banned, self._pad_id)
        self._sampling = SamplingBatch(loaded.model, loaded.tokenizer, self._banned, self._pad_id)
        self._adaptive = AdaptiveK(self.num_sat) if self.config.adaptive else None
        self.k = self.num_sat  # k of the latest greedy step
        self._lock = threading.Lock()  # guards _pending, _cancels, _ids, _stopping
        self._wake = threading.Event()
        self._pending: deque[_Active] = deque()
        self._cancels: dict[int, str] = {}  # seq_id -> "cancelled" (by id) or "" (consumer left)
        self._ids: dict[str, _Active] = {}  # request_id -> request, while in the engine
        self._running: dict[int, _Active] = {}  # seq_id -> request; engine thread only
        self._stopping = False
        self.totals: Counter = Counter()
        self._thread = threading.Thread(target=self._run, name="sdsat-engine", daemon=True)
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

    # ---- the event-loop side -------------------------------------------------------------

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

    async def generate(self, request: Request) -> AsyncIterator[Chunk]:
        """Validate, queue and stream one request. Leaving the iteration early (aclose, a
        cancelled task, a client gone) cancels it: its row leaves at the next step boundary."""
        active = self._accept(request, asyncio.get_running_loop())
        try:
            while True:
                item = await active.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not active.done:
                self._cancel(active, "")

    def _accept(self, request: Request, loop: asyncio.AbstractEventLoop) -> _Active:
        self.validate(request)
        sampling = None
        if request.temperature > 0:
            sampling = SamplingParams(request.temperature, request.top_p, request.seed)
        seq = make_sequences(self.loaded, [list(request.prompt_ids)], request.max_new_tokens, stop=request.stop)[0]
        seq.num_sat = request.num_sat
        active = _Active(request, seq, sampling, loop, asyncio.Queue(), TextStream(self.loaded.tokenizer))
        with self._lock:
            if self._stopping:
                raise EngineError("the engine is shut down")
            if request.request_id in self._ids:
                raise ValueError(f"request_id {request.request_id!r} is already in use")
            if len(self._pending) >= self.config.max_queue:
                self.totals["refused"] += 1
                raise EngineOverloaded(f"the engine's queue is full ({self.config.max_queue} waiting requests)")
            self._pending.append(active)
            self._ids[request.request_id] = active
            self.totals["requests"] += 1
        self._wake.set()
        return active

    def cancel(self, request_id: str) -> bool:
        """Cancel a request by id: its iterator ends with finish_reason "cancelled". False if unknown."""
        with self._lock:
            active = self._ids.get(request_id)
        if active is None or active.done:
            return False
        self._cancel(active, "cancelled")
        return True

    def _cancel(self, active: _Active, reason: str) -> None:
        with self._lock:
            if active in self._pending:
                self._pending.remove(active)
                self._ids.pop(active.request.request_id, None)
                self.totals["cancelled"] += 1
                waiting = True
            else:
                self._cancels[active.sequence.seq_id] = reason
                waiting = False
        if waiting:
            active.sequence.finish_reason = "cancelled"
            self._finish(active, reason)
        self._wake.set()

    def snapshot(self) -> dict:
        """Running and queued requests, batch size, current k and totals."""
        with self._lock:
            queued = len(self._pending)
            totals = dict(self.totals)
        out = {
            "running": len(self._running),
            "queued": queued,
            "batch_size": len(self._greedy) + len(self._sampling),
            "greedy_batch": len(self._greedy),
            "sampling_batch": len(self._sampling),
            "k": self.k,
            "num_sat": self.num_sat,
            "adaptive": self._adaptive is not None,
            "totals": totals,
        }
        if self._adaptive is not None:
            out["acceptance_per_offset"] = self._adaptive.acceptance()
        return out

    async def shutdown(self) -> None:
        """Stop the decode loop; requests still queued or running fail with EngineError."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    break
            try:
                self._admit()
                self._apply_cancels()
                if not len(self._greedy) and not len(self._sampling):
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._step(self._greedy)
                self._step(self._sampling)
            except Exception as exc:  # a bug outside a step: fail what runs, keep the loop alive
                log.exception("engine loop failed")
                self._fail_batch(self._greedy, exc)
                self._fail_batch(self._sampling, exc)
        self._drain(EngineError("the engine shut down before this request finished"))

    def _admit(self) -> None:
        room = self.config.max_batch_size - len(self._greedy) - len(self._sampling)
        with self._lock:
            taken = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        greedy = [a for a in taken if a.sampling is None]
        sampled = [a for a in taken if a.sampling is not None]
        self._prefill(self._greedy, greedy)
        self._prefill(self._sampling, sampled)

    def _prefill(self, batch: Batch, group: list[_Active]) -> None:
        """Let a group join a batch; if its prefill fails, retry one by one and fail only the culprits."""
        if not group:
            return
        try:
            self._add(batch, group)
        except Exception as exc:
            if len(group) == 1:
                log.exception("prefill failed for request %s", group[0].request.request_id)
                self._fail(group[0], EngineError(f"prefill failed: {exc!r}"))
                return
            for active in group:
                self._prefill(batch, [active])
            return
        for active in group:
            self._running[active.sequence.seq_id] = active

    @staticmethod
    def _add(batch: Batch, group: list[_Active]) -> None:
        sequences = [a.sequence for a in group]
        if isinstance(batch, SamplingBatch):
            batch.add(sequences, [a.sampling for a in group])
        else:
            batch.add(sequences)

    def _apply_cancels(self) -> None:
        with self._lock:
            cancels, self._cancels = self._cancels, {}
        if not cancels:
            return
        for batch in (self._greedy, self._sampling):
            for seq in batch.cancel(set(cancels)):
                active = self._running.pop(seq.seq_id)
                self._count(cancelled=1)
                self._finish(active, cancels[seq.seq_id])

    def _choose_k(self, batch: Batch) -> int:
        caps = [s.num_sat for s in batch.sequences if s.num_sat is not None]
        k = self._adaptive.propose(len(batch)) if self._adaptive is not None else self.num_sat
        return min([k, *caps])

    def _step(self, batch: Batch) -> None:
        if not len(batch):
            return
        greedy = not isinstance(batch, SamplingBatch)
        k = self._choose_k(batch) if greedy else 0
        before = {s.seq_id: s.stats.accepted for s in batch.sequences}
        size = len(batch)
        start = time.perf_counter()
        try:
            events = batch.step(self.loaded.require_sat(k)) if greedy else batch.step()
        except Exception as exc:
            log.exception("decode step failed (batch of %d, k=%d)", size, k)
            self._fail_batch(batch, exc)
            return
        step_s = time.perf_counter() - start
        accepted = [e.sequence.stats.accepted - before[e.sequence.seq_id] for e in events]
        if greedy:
            self.k = k
            if self._adaptive is not None:
                self._adaptive.observe(size, k, step_s, accepted)
        for event in events:
            self._deliver(event)
        self._report(StepMetrics(
            batch_size=size,
            k=k,
            step_s=step_s,
            new_tokens=sum(len(e.new_ids) for e in events),
            drafted=k * size,
            accepted_per_offset=[sum(a > j for a in accepted) for j in range(k)],
            queue_length=len(self._pending),
            mode="greedy" if greedy else "sampling",
        ))

    def _report(self, metrics: StepMetrics) -> None:
        self._count(
            steps=1,
            tokens=metrics.new_tokens,
            drafted=metrics.drafted,
            accepted=sum(metrics.accepted_per_offset),
        )
        if self.on_step is not None:
            try:
                self.on_step(metrics)
            except Exception:
                log.exception("on_step callback failed")

    def _deliver(self, event: StepEvent) -> None:
        active = self._running.get(event.sequence.seq_id)
        if active is None:
            return
        seq = event.sequence
        try:
            text = active.text.delta(seq)
        except Exception as exc:
            log.exception("detokenizing request %s failed", active.request.request_id)
            self._fail_rows([seq.seq_id], exc)
            return
        if not event.new_ids and not text and not seq.finished:
            return
        chunk = self._chunk(active, event.new_ids, text)
        if seq.finished:
            self._running.pop(seq.seq_id)
            self._count(finished=1)
            active.done = True
            with self._lock:
                self._ids.pop(active.request.request_id, None)
        self._push(active, chunk)

    def _chunk(self, active: _Active, token_ids: list[int], text: str) -> Chunk:
        seq = active.sequence
        stats = None
        if seq.finished:
            stats = {**seq.stats.to_dict(), "mode": active.mode}
        return Chunk(
            token_ids=list(token_ids),
            text=text,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            stats=stats,
        )

    def _finish(self, active: _Active, reason: str) -> None:
        """End a cancelled request: a last chunk (with any held-back text) if it was cancelled
        by id; nothing if its consumer left."""
        active.done = True
        with self._lock:
            self._ids.pop(active.request.request_id, None)
        if reason:
            active.sequence.finish_reason = reason
            self._push(active, self._chunk(active, [], active.text.delta(active.sequence)))

    def _count(self, **increments: int) -> None:
        with self._lock:
            self.totals.update(increments)

    def _fail_batch(self, batch: Batch, exc: Exception) -> None:
        """A step failed: its rows' state is unknown, so all of them fail and the batch starts afresh."""
        self._fail_rows([s.seq_id for s in batch.sequences], exc)

    def _fail_rows(self, seq_ids: list[int], exc: Exception) -> None:
        for batch in (self._greedy, self._sampling):
            batch.cancel(set(seq_ids), reason="error")
        for seq_id in seq_ids:
            active = self._running.pop(seq_id, None)
            if active is not None:
                self._fail(active, EngineError(f"decoding failed: {exc!r}"))
        if not len(self._greedy):
            self._greedy = Batch(self.loaded.model, self.loaded.tokenizer, self._banned, self._pad_id)
        if not len(self._sampling):
            self._sampling = SamplingBatch(self.loaded.model, self.loaded.tokenizer, self._banned, self._pad_id)

    def _fail(self, active: _Active, error: EngineError) -> None:
        self._count(failed=1)
        active.done = True
        with self._lock:
            self._ids.pop(active.request.request_id, None)
        self._push(active, error)

    def _drain(self, error: EngineError) -> None:
        with self._lock:
            waiting = list(self._pending)
            self._pending.clear()
        for active in [*waiting, *self._running.values()]:
            self._fail(active, error)
        self._running.clear()

    def _push(self, active: _Active, item: Chunk | BaseException) -> None:
        try:
            active.loop.call_soon_threadsafe(active.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            if not active.done:
                with self._lock:
                    self._cancels[active.sequence.seq_id] = ""
