"""The serving engine end to end (asyncio, no Ray): exactness under batching, streaming,
stop strings, cancellation, validation, seeded sampling, faults and overload."""

from __future__ import annotations

import asyncio

import pytest

from sdsat.engine.engine import Engine, EngineConfig, EngineError, EngineOverloaded, Request
from sdsat.decode.generate import generate, make_sequences
from sdsat.decode.scheduler import Scheduler
from tests.conftest import tiny_loaded, single_torch_thread

PROMPTS = [[(7 * i + j) % 200 + 3 for j in range(3 + i)] for i in range(16)]  # 16 ragged prompts
NEW = 32


one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded("llama", k=8)


def alone(loaded, prompt, n=NEW, stop=()):
    """Plain greedy decoding of one prompt by itself: the reference output."""
    return generate(loaded, make_sequences(loaded, [prompt], n, stop=stop), num_sat=0)[0]


async def collect(engine, request):
    """Run a request to the end: (token ids, text, chunks)."""
    chunks = [c async for c in engine.generate(request)]
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks


FREE = lambda rows, q: 1.0  # noqa: E731  (an injected pass cost: wide passes cost nothing extra)


def run_engine(loaded, body, config=None, on_step=None, scheduler=None):
    """Run ``body(engine)`` on a fresh engine inside asyncio.run and shut the engine down."""

    async def main():
        engine = Engine(loaded, config or EngineConfig(), on_step, scheduler)
        try:
            return await body(engine)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


@pytest.mark.parametrize("costs,lookup", [("free", 0), ("free", 6), ("measured", 6), ("none", 6)])
def test_concurrent_greedy_equals_generate_alone(tiny, costs, lookup):
    """16 ragged requests at once; the drafts a scheduler on injected free costs, on costs
    measured at start-up (while serving), or none (no measurement: plain steps) choose."""
    steps = []

    async def body(engine):
        return await asyncio.gather(*[collect(engine, Request(p, NEW)) for p in PROMPTS])

    config = EngineConfig(num_sat=4, lookup=lookup, calibration_budget_s=0.0 if costs == "none" else 0.5)
    scheduler = Scheduler(FREE) if costs == "free" else None
    results = run_engine(tiny, body, config, steps.append, scheduler)
    for prompt, (tokens, text, chunks) in zip(PROMPTS, results):
        ref = alone(tiny, prompt)
        assert tokens == ref.output_ids
        assert text == ref.text(tiny.tokenizer)  # streamed deltas concatenate to the final text
        last = chunks[-1]
        assert last.finish_reason == ref.finish_reason
        assert last.completion_tokens == len(ref.output_ids) and last.prompt_tokens == len(prompt)
        assert all(c.finish_reason is None and c.stats is None for c in chunks[:-1])
        assert last.stats["new_tokens"] == len(tokens)
    assert max(s.batch_size for s in steps) > 1
    if costs == "free":
        # it drafted (until it learned that this random model's drafts are wrong, where lookup is off)
        assert sum(s.width > 1 for s in steps) >= 2
        assert all(r[2][-1].stats["mode"] == "sdsat" for r in results)
        assert sum(s.drafts.total("verified") for s in steps) > 0 and any(s.k for s in steps)
    if costs == "none":
        assert all(s.width == 1 and s.drafts.total("verified") == 0 for s in steps)


def test_num_sat_zero_is_plain_beside_drafting_rows(tiny):
    """A request's num_sat caps its own row only: 0 there, drafts in the others."""

    async def body(engine):
        return await asyncio.gather(
            collect(engine, Request(PROMPTS[3], NEW, num_sat=0)),
            collect(engine, Request(PROMPTS[4], NEW)),
            collect(engine, Request(PROMPTS[5], NEW, num_sat=1)),
        )

    steps = []
    (tokens, _, chunks), (t4, _, c4), (t5, _, c5) = run_engine(
        tiny, body, EngineConfig(num_sat=4, lookup=0), steps.append, Scheduler(FREE)
    )
    assert tokens == alone(tiny, PROMPTS[3]).output_ids
    assert t4 == alone(tiny, PROMPTS[4]).output_ids and t5 == alone(tiny, PROMPTS[5]).output_ids
    assert chunks[-1].stats["mode"] == "plain" and chunks[-1].stats["drafted"] == 0
    assert c4[-1].stats["mode"] == "sdsat" and c4[-1].stats["num_sat"] == 4
    assert c5[-1].stats["mode"] == "sdsat" and c5[-1].stats["num_sat"] == 1  # its drafts were one deep


def test_stop_string_cut_and_never_streamed(tiny):
    prompt = PROMPTS[5]
    full = alone(tiny, prompt, n=40).text(tiny.tokenizer)
    stop = full[12:15]
    expected = full[: full.find(stop)]

    async def body(engine):
        return await collect(engine, Request(prompt, 40, stop=("never-there", stop)))

    tokens, text, chunks = run_engine(tiny, body, EngineConfig(num_sat=4), scheduler=Scheduler(FREE))
    assert text == expected
    assert chunks[-1].finish_reason == "stop"
    assert all(stop not in c.text for c in chunks)
    assert tokens == alone(tiny, prompt, n=40, stop=(stop,)).output_ids


def test_leaving_the_iteration_cancels_and_frees_the_row(tiny):
    async def body(engine):
        stream = engine.generate(Request(PROMPTS[0], 500))
        await stream.__anext__()
        await stream.aclose()  # the consumer goes away
        task = asyncio.create_task(collect(engine, Request(PROMPTS[1], 500)))
        await asyncio.sleep(0.05)
        task.cancel()  # a disconnected client's handler task is cancelled
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if engine.snapshot()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        snap = engine.snapshot()
        after = await collect(engine, Request(PROMPTS[2], 8))
        return snap, after

    snap, (tokens, _, _) = run_engine(tiny, body, EngineConfig(num_sat=4))
    assert snap["running"] == 0 and snap["batch_size"] == 0
    assert snap["totals"]["cancelled"] == 2
    assert tokens == alone(tiny, PROMPTS[2], n=8).output_ids


def test_cancel_by_id_ends_with_cancelled(tiny):
    async def body(engine):
        request = Request(PROMPTS[4], 500)
        chunks = []
        async for chunk in engine.generate(request):
            chunks.append(chunk)
            if len(chunks) == 2:
                assert engine.cancel(request.request_id)
        return chunks

    chunks = run_engine(tiny, body, EngineConfig(num_sat=4))
    assert chunks[-1].finish_reason == "cancelled"
    tokens = [t for c in chunks for t in c.token_ids]
    assert "".join(c.text for c in chunks) == tiny.tokenizer.decode(tokens)
    assert 0 < chunks[-1].completion_tokens < 500


def test_bad_engine_config_is_refused():
    with pytest.raises(ValueError, match="calibration_budget_s must be >= 0"):
        EngineConfig(calibration_budget_s=-1)
    with pytest.raises(ValueError, match="lookup must be >= 0"):
        EngineConfig(lookup=-1)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prompt_ids=[]), "prompt is empty"),
        (dict(prompt_ids=[5, 999]), "invalid token ids"),
        (dict(prompt_ids=[5, 250]), "invalid token ids"),  # a SAT id
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=3000), "max_new_tokens"),
        (dict(prompt_ids=[5] * 1000, max_new_tokens=100), "context"),
        (dict(num_sat=9), "num_sat"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_validation_errors_name_the_problem(tiny, change, message):
    async def body(engine):
        request = Request(**{"prompt_ids": [5, 6, 7], "max_new_tokens": 8, **change})
        with pytest.raises(ValueError, match=message):
            engine.validate(request)
        with pytest.raises(ValueError, match=message):
            await collect(engine, request)
        return await collect(engine, Request([5, 6, 7], 4))  # the engine still serves

    tokens, _, _ = run_engine(tiny, body)
    assert len(tokens) == 4


def test_seeded_sampling_reproduces(tiny):
    async def body(engine):
        req = lambda seed, **kw: Request(PROMPTS[6], 24, temperature=0.9, seed=seed, **kw)  # noqa: E731
        # The same seed alone and batched with other sampling and greedy requests.
        first = await collect(engine, req(1234))
        batched = await asyncio.gather(
            collect(engine, req(1234)),
            collect(engine, req(99)),
            collect(engine, Request(PROMPTS[7], 24, temperature=1.3, top_p=0.8, seed=5)),
            collect(engine, Request(PROMPTS[8], 24)),
        )
        nucleus_of_one = await collect(engine, req(7, top_p=1e-6))
        return first, batched, nucleus_of_one

    first, batched, nucleus_of_one = run_engine(tiny, body, EngineConfig(num_sat=4))
    assert batched[0][0] == first[0]
    assert batched[1][0] != first[0]
    assert first[2][-1].stats["mode"] == "sampling"
    assert nucleus_of_one[0] == alone(tiny, PROMPTS[6], n=24).output_ids  # top_p -> 0 is greedy
    assert batched[3][0] == alone(tiny, PROMPTS[8], n=24).output_ids


POISON = 201  # a valid token id that the fault hook below turns into an exception inside the model


def poison_hook(embedding, args):
    if (args[0] == POISON).any():
        raise RuntimeError("injected fault inside the model")


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny):
    # The last prompt token is first fed at a decode step (prefill writes the others),
    # so a prompt ending in POISON fails inside a step; one holding it earlier fails in prefill.
    handle = tiny.model.get_input_embeddings().register_forward_pre_hook(poison_hook)

    async def body(engine):
        in_step = await asyncio.gather(
            collect(engine, Request([5, 6, POISON], 8)),
            collect(engine, Request([5, 6, 7], 8, temperature=0.5, seed=1)),
            return_exceptions=True,
        )
        in_prefill = await asyncio.gather(
            collect(engine, Request([5, POISON, 6], 8)),
            collect(engine, Request(PROMPTS[9], 8)),
            return_exceptions=True,
        )
        later = await collect(engine, Request(PROMPTS[10], 8))
        return in_step, in_prefill, later, engine.snapshot()

    try:
        in_step, in_prefill, later, snap = run_engine(tiny, body, EngineConfig(num_sat=4))
    finally:
        handle.remove()
    assert isinstance(in_step[0], EngineError) and "injected fault" in str(in_step[0])
    assert isinstance(in_step[1], EngineError)  # a sampling row shares the greedy rows' step, so it fails with it
    assert isinstance(in_prefill[0], EngineError) and "prefill" in str(in_prefill[0])
    assert in_prefill[1][0] == alone(tiny, PROMPTS[9], n=8).output_ids  # its prefill group retried it alone
    assert later[0] == alone(tiny, PROMPTS[10], n=8).output_ids
    assert snap["totals"]["failed"] == 3


def test_full_queue_refuses_and_a_queued_request_can_be_cancelled(tiny):
    async def body(engine):
        running = engine.generate(Request(PROMPTS[0], 500))
        await running.__anext__()  # admitted: the only row (max_batch_size=1)
        queued = Request(PROMPTS[1], 8)
        waiting = asyncio.create_task(collect(engine, queued))
        while engine.snapshot()["queued"] == 0:
            await asyncio.sleep(0.001)
        with pytest.raises(EngineOverloaded, match="queue is full"):
            await collect(engine, Request([5, 6], 4))
        assert engine.cancel(queued.request_id)
        tokens, _, chunks = await waiting
        await running.aclose()
        return tokens, chunks, engine.snapshot()

    tokens, chunks, snap = run_engine(tiny, body, EngineConfig(max_batch_size=1, max_queue=1))
    assert tokens == [] and chunks[-1].finish_reason == "cancelled"
    assert snap["totals"]["refused"] == 1


def test_shutdown_fails_what_is_left(tiny):
    async def main():
        engine = Engine(tiny, EngineConfig(num_sat=4))
        task = asyncio.create_task(collect(engine, Request(PROMPTS[0], 1000)))
        await asyncio.sleep(0.05)
        await engine.shutdown()
        with pytest.raises(EngineError, match="shut down"):
            await task
        with pytest.raises(EngineError, match="shut down"):
            await collect(engine, Request(PROMPTS[0], 4))

    asyncio.run(main())


def test_max_batch_size_caps_the_rows(tiny):
    steps = []

    async def body(engine):
        return await asyncio.gather(*[collect(engine, Request(p, 12)) for p in PROMPTS[:6]])

    results = run_engine(tiny, body, EngineConfig(max_batch_size=2, num_sat=4), steps.append)
    assert max(s.batch_size for s in steps) == 2
    assert [r[0] for r in results] == [alone(tiny, p, n=12).output_ids for p in PROMPTS[:6]]


@pytest.mark.slow
@pytest.mark.parametrize("costs", ["free", "measured"])
def test_default_model_concurrent_equals_alone(default_fp32, costs):
    tok = default_fp32.tokenizer
    texts = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n", "Once upon a time"]
    prompts = [tok.encode(t) for t in texts]
    steps = []

    stops = [(), ("\n",), (), (",", ".")]

    async def body(engine):
        return await asyncio.gather(*[collect(engine, Request(p, 24, stop=s)) for p, s in zip(prompts, stops)])

    scheduler = Scheduler(FREE) if costs == "free" else None
    results = run_engine(default_fp32, body, EngineConfig(num_sat=4, calibration_budget_s=2.0), steps.append, scheduler)
    for prompt, stop, (tokens, text, chunks) in zip(prompts, stops, results):
        ref = alone(default_fp32, prompt, n=24, stop=stop)
        assert tokens == ref.output_ids
        assert text == ref.text(tok)
        assert chunks[-1].finish_reason == ref.finish_reason
        assert not any(s in text for s in stop)
    assert [r[2][-1].finish_reason for r in results][1::2] == ["stop", "stop"]  # " Paris." and ","
    assert max(s.batch_size for s in steps) > 1
