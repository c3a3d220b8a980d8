"""The engine's decode loop: one thread that owns the model and its batch.

Each turn of the loop:
1. admit queued requests while fewer than ``max_batch_size`` rows run (prefill; they join);
2. drop rows whose request was cancelled (they leave between steps);
3. step the batch: the fused decoder, its drafts chosen per row by the scheduler; greedy
   and sampling rows share its passes (sampling rows accept by speculative sampling's rule);
4. hand each row's new tokens and text to its request's asyncio queue
   (``loop.call_soon_threadsafe``: no torch work ever runs on an event loop thread).

Until the pass-cost curve is measured (:mod:`sdsat.decode.calibrate`, a few seconds), the
batch takes plain steps and one measuring pass runs per turn of the loop: no request
waits behind the measurement. An exception in a step fails that step's requests with
:class:`EngineError`; the loop goes on with later requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

from ..decode.batch import Batch, Sequence, StepEvent
from ..decode.calibrate import Calibration
from ..decode.scheduler import Scheduler
from .kv_budget import KVBudget
from .types import Chunk, EngineConfig, EngineError, EngineOverloaded, StepMetrics
from ..model.load import LoadedModel
from ..decode.target import SamplingParams
from .text_stream import TextStream

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ActiveRequest:
    """A request inside the engine: its sequence and the way back to its consumer."""

    request_id: str
    sequence: Sequence
    sampling: SamplingParams | None  # None: greedy
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # of Chunk, or the EngineError that ends the request
    text: TextStream
    done: bool = False  # its last chunk or its error was handed out, or its consumer left

    @property
    def mode(self) -> str:
        if self.sampling is not None:
            return "sampling"
        return "sdsat" if self.sequence.stats.num_sat else "plain"

    def push(self, item: Chunk | EngineError) -> bool:
        """Hand an item to the consumer's event loop; False if that loop is closed."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:
            return False


class Inbox:
    """What event loops hand to the engine thread: new requests, cancellations, shutdown.
    Also the engine's counters. Every method is thread-safe."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.pending: deque[ActiveRequest] = deque()
        self.cancels: dict[int, str] = {}  # seq_id -> "cancelled" (by id) or "" (consumer left)
        self.by_id: dict[str, ActiveRequest] = {}  # request_id -> request, while in the engine
        self.stopping = False
        self.totals: Counter = Counter()

    def submit(self, active: ActiveRequest) -> None:
        with self.lock:
            if self.stopping:
                raise EngineError("the engine is shut down")
            if active.request_id in self.by_id:
                raise ValueError(f"request_id {active.request_id!r} is already in use")
            if len(self.pending) >= self.max_queue:
                self.totals["refused"] += 1
                raise EngineOverloaded(f"the engine's queue is full ({self.max_queue} waiting requests)")
            self.pending.append(active)
            self.by_id[active.request_id] = active
            self.totals["requests"] += 1
        self.wake.set()

    def withdraw(self, active: ActiveRequest, reason: str) -> bool:
        """Cancel a request: True if it was still queued (now removed), else its row leaves at
        the next step boundary."""
        with self.lock:
            queued = active in self.pending
            if queued:
                self.pending.remove(active)
                self.by_id.pop(active.request_id, None)
                self.totals["cancelled"] += 1
            else:
                self.cancels[active.sequence.seq_id] = reason
        self.wake.set()
        return queued

    def take(
        self, room: int | None = None, fits: Callable[[ActiveRequest, list[ActiveRequest]], bool] | None = None
    ) -> list[ActiveRequest]:
        """Up to ``room`` queued requests (all of them if None), oldest first; with ``fits``,
        stop at the first that does not fit beside those taken before it (no overtaking)."""
        with self.lock:
            n = len(self.pending) if room is None else min(room, len(self.pending))
            taken: list[ActiveRequest] = []
            while len(taken) < n and (fits is None or fits(self.pending[0], taken)):
                taken.append(self.pending.popleft())
            return taken

    def take_cancels(self) -> dict[int, str]:
        with self.lock:
            cancels, self.cancels = self.cancels, {}
        return cancels

    def forget(self, active: ActiveRequest) -> None:
        active.done = True
        with self.lock:
            self.by_id.pop(active.request_id, None)

    def find(self, request_id: str) -> ActiveRequest | None:
        with self.lock:
            return self.by_id.get(request_id)

    def count(self, **increments: int) -> None:
        with self.lock:
            self.totals.update(increments)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
        self.wake.set()

    def should_stop(self) -> bool:
        with self.lock:
            return self.stopping

    def queued(self) -> int:
        with self.lock:
            return len(self.pending)


class DecodeLoop:
    """Runs in the engine thread: admits, steps and delivers."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        num_sat: int,
        inbox: Inbox,
        on_step: Callable[[StepMetrics], None] | None,
        scheduler: Scheduler | None = None,
    ):
        self.loaded = loaded
        self.config = config
        self.inbox = inbox
        self.on_step = on_step
        self.num_sat = num_sat  # SATs a row may draft with (each request's num_sat caps its own row)
        self.sat_ids = loaded.require_sat(num_sat)
        self.drafting = bool(num_sat or config.lookup)
        self.banned = loaded.sat.unique_ids if loaded.sat else []
        self.pad_id = getattr(loaded.tokenizer, "pad_token_id", None) or 0
        self.scheduler = scheduler  # None until the pass-cost curve is measured
        self.calibration: Calibration | None = None
        self.calibration_s: float | None = None  # seconds of measuring passes (None: not finished)
        self.width = 1  # query tokens per row of the latest pass
        self.batch = self._new_batch()
        self.running: dict[int, ActiveRequest] = {}  # seq_id -> request; this thread only
        # The widest pass writes the root, two chains of k SAT drafts and the lookup trie.
        self.kv = KVBudget.for_model(loaded.model, config.kv_budget_bytes, room=1 + 2 * num_sat + config.lookup)

    def _new_batch(self) -> Batch:
        return Batch(self.loaded.model, self.loaded.tokenizer, self.banned, self.pad_id, scheduler=self.scheduler)

    def run(self) -> None:
        while not self.inbox.should_stop():
            try:
                self._admit()
                self._apply_cancels()
                measuring = self._measure()
                if not len(self.batch):
                    if not measuring:
                        self.inbox.wake.wait()
                        self.inbox.wake.clear()
                    continue
                self._step(self.batch)
            except Exception as exc:  # a bug outside a step: fail what runs, keep the loop alive
                log.exception("engine loop failed")
                self._fail_rows([*self.running], exc)
        self._drain(EngineError("the engine shut down before this request finished"))

    def _measure(self) -> bool:
        """One pass of the start-up pass-cost measurement; True while it goes on. A failure
        leaves the engine decoding plainly."""
        if not self.drafting or self.scheduler is not None or not self.config.calibration_budget_s:
            return False
        try:
            if self.calibration is None:
                self.calibration = Calibration(self.loaded, budget_s=self.config.calibration_budget_s, pad_id=self.pad_id)
            self.calibration.step()
            if not self.calibration.done:
                return True
            self.scheduler = Scheduler(self.calibration.cost())
            self.batch.scheduler = self.scheduler
            self.calibration_s = self.calibration.spent
            log.info("pass costs measured in %.1f s: %s", self.calibration_s, self.scheduler.cost.ratios())
        except Exception:
            log.exception("measuring pass costs failed; decoding plainly")
            self.drafting = False
        self.calibration = None
        return False

    # ---- joining and leaving -------------------------------------------------------------

    def _admit(self) -> None:
        room = self.config.max_batch_size - len(self.batch)
        self._prefill(self.batch, self.inbox.take(room, self._fits_kv if self.kv.budget_bytes is not None else None))

    def _prefill(self, batch: Batch, group: list[ActiveRequest]) -> None:
        """Let a group join a batch; if its prefill fails, retry one by one and fail only the culprits."""
        if not group:
            return
        sequences = [a.sequence for a in group]
        try:
            batch.add(sequences, [a.sampling for a in group])
        except Exception as exc:
            if len(group) > 1:
                for active in group:
                    self._prefill(batch, [active])
                return
            log.exception("prefill failed for request %s", group[0].request_id)
            self._fail(group[0], EngineError(f"prefill failed: {exc!r}"))
            return
        for active in group:
            self.running[active.sequence.seq_id] = active

    def _fits_kv(self, candidate: ActiveRequest, taken: list[ActiveRequest]) -> bool:
        """Whether the KV cache has room for this request beside the running and taken ones,
        each at its longest (a request alone always fits: Engine.validate refused the others)."""
        rows = [self.kv.row_tokens(len(a.sequence.prompt_ids), a.sequence.max_new_tokens)
                for a in [*self.running.values(), *taken, candidate]]
        return len(rows) == 1 or self.kv.fits(rows[:-1], rows[-1])

    def _apply_cancels(self) -> None:
        cancels = self.inbox.take_cancels()
        if not cancels:
            return
        for seq in self.batch.cancel(set(cancels)):
            active = self.running.pop(seq.seq_id)
            self.inbox.count(cancelled=1)
            self._end_cancelled(active, cancels[seq.seq_id])

    def _end_cancelled(self, active: ActiveRequest, reason: str) -> None:
        """A last chunk (with any held-back text) if cancelled by id; nothing if its consumer left."""
        self.inbox.forget(active)
        if reason:
            active.sequence.finish_reason = reason
            active.push(self._chunk(active, [], active.text.delta(active.sequence)))

    # ---- stepping -------------------------------------------------------------------------

    def _step(self, batch: Batch) -> None:
        if not len(batch):
            return
        scheduled = batch.scheduler is not None and self.drafting
        size = len(batch)
        start = time.perf_counter()
        try:
            events = batch.scheduled_step(self.sat_ids, self.config.lookup) if scheduled else batch.step()
        except Exception as exc:
            log.exception("decode step failed (batch of %d)", size)
            self._fail_rows([s.seq_id for s in batch.sequences], exc)
            return
        step_s = time.perf_counter() - start
        plan = batch.last_plan if scheduled else None
        self.width = plan.width if plan is not None else 1
        for event in events:
            self._deliver(event)
        self._report(StepMetrics(
            batch_size=size,
            k=max((p.block for p in plan.rows), default=0) if plan is not None else 0,
            step_s=step_s,
            new_tokens=sum(len(e.new_ids) for e in events),
            drafts=batch.counts,
            queue_length=self.inbox.queued(),
            width=self.width,
        ))

    def _report(self, metrics: StepMetrics) -> None:
        self.inbox.count(
            steps=1, tokens=metrics.new_tokens, drafted=metrics.drafts.total("verified"), accepted=metrics.drafts.total("accepted")
        )
        if self.on_step is not None:
            try:
                self.on_step(metrics)
            except Exception:
                log.exception("on_step callback failed")

    # ---- handing out ------------------------------------------------------------------

    def _deliver(self, event: StepEvent) -> None:
        seq = event.sequence
        active = self.running.get(seq.seq_id)
        if active is None:
            return
        try:
            text = active.text.delta(seq)
        except Exception as exc:
            log.exception("detokenizing request %s failed", active.request_id)
            self._fail_rows([seq.seq_id], exc)
            return
        if not event.new_ids and not text and not seq.finished:
            return
        chunk = self._chunk(active, event.new_ids, text)
        if seq.finished:
            del self.running[seq.seq_id]
            self.inbox.count(finished=1)
            self.inbox.forget(active)
        if not active.push(chunk) and not seq.finished:  # its event loop is gone: nobody listens
            self.inbox.withdraw(active, "")

    @staticmethod
    def _chunk(active: ActiveRequest, token_ids: list[int], text: str) -> Chunk:
        seq = active.sequence
        end = len(seq.output_ids)  # this chunk's tokens are the output's last ones
        return Chunk(
            token_ids=list(token_ids),
            text=text,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            stats={**seq.stats.to_dict(), "mode": active.mode} if seq.finished else None,
            logprobs=None if seq.logprobs is None else seq.token_logprobs[end - len(token_ids) : end],
            prompt_logprobs=seq.prompt_token_logprobs if end == len(token_ids) else None,  # the first chunk
        )

    # ---- failing ----------------------------------------------------------------------

    def _fail_rows(self, seq_ids: list[int], exc: Exception) -> None:
        """These rows' state is unknown: they leave and their requests fail. An emptied batch
        starts afresh (its cache may be half-written)."""
        self.batch.cancel(set(seq_ids), reason="error")
        for seq_id in seq_ids:
            active = self.running.pop(seq_id, None)
            if active is not None:
                self._fail(active, EngineError(f"decoding failed: {exc!r}"))
        if not len(self.batch):
            self.batch = self._new_batch()

    def _fail(self, active: ActiveRequest, error: EngineError) -> None:
        self.inbox.count(failed=1)
        self.inbox.forget(active)
        active.push(error)

    def _drain(self, error: EngineError) -> None:
        for active in [*self.inbox.take(), *self.running.values()]:
            self._fail(active, error)
        self.running.clear()
