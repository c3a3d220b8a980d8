"""The OpenAI fields stock clients send, through the stock ``openai`` client against a real
Serve app (tiny random model, fp32, drafting on): logprobs, echo, batches of prompts, n > 1,
max_completion_tokens, content parts, penalties, and the unknown-field policy; streaming and
not, greedy and sampled; bad values for each.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from sdsat.decode.generate import generate, make_sequences
from sdsat.engine.engine import Engine, EngineConfig, Request
from sdsat.model.load import load_model
from tests.serve_utils import free_port, make_tiny_checkpoint, start_ray_serve, stop_ray_serve, wait_healthy

pytestmark = pytest.mark.slow

TINY = "tiny"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ray import serve

    from deployments.sdsat import build_app

    tiny = make_tiny_checkpoint(tmp_path_factory.mktemp("fields") / "tiny")
    port = free_port()
    start_ray_serve(port)
    try:
        args = {"model": str(tiny), "dtype": "float32", "model_name": TINY, "cpus_per_replica": 0.5, "router_cpus": 0.05}
        serve.run(build_app(args), name="tiny", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        yield {"base": base, "loaded": load_model(str(tiny), dtype="float32")}
    finally:
        stop_ray_serve()


@pytest.fixture(scope="module")
def oai(served) -> OpenAI:
    return OpenAI(base_url=f"{served['base']}/v1", api_key="unused", max_retries=0, timeout=120)


def encode(loaded, text: str) -> list[int]:
    return loaded.tokenizer.encode(text)


def greedy_ids(loaded, prompt_ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding of the checkpoint in this process (the reference)."""
    return generate(loaded, make_sequences(loaded, [prompt_ids], n), num_sat=0)[0].output_ids


def log_softmax(loaded, ids: list[int]) -> torch.Tensor:
    """Row i: the model's log-probabilities of token i + 1 (SATs excluded), one plain fp32 forward."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids])).logits[0, :-1].float()
    logits[:, loaded.sat.unique_ids] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def token_text(loaded, token_id: int) -> str:
    return loaded.tokenizer.decode([token_id])


def post(served, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{served['base']}/v1/{route}", json=body, timeout=120)


def sse_json(served, route: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{served['base']}/v1/{route}", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---- logprobs and echo --------------------------------------------------------------------


def test_completion_logprobs_equal_a_plain_forward(served, oai):
    loaded = served["loaded"]
    prompt = encode(loaded, PROMPT)
    out = oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=12, logprobs=2)
    ids = greedy_ids(loaded, prompt, 12)
    ref = log_softmax(loaded, prompt + ids)
    lp = out.choices[0].logprobs
    assert lp.tokens == [token_text(loaded, t) for t in ids]
    for i, token in enumerate(ids):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_logprobs[i] == pytest.approx(row[token].item(), abs=1e-4)
        top_ids = row.topk(2).indices.tolist()
        expected = {token_text(loaded, t): row[t].item() for t in top_ids + [token]}
        assert lp.top_logprobs[i] == pytest.approx(expected, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]

    chunks = list(oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=12, logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_sampled_logprobs_are_the_models_own(served, oai):
    loaded = served["loaded"]
    prompt = encode(loaded, PROMPT)
    body = {"model": TINY, "prompt": prompt, "max_tokens": 10, "temperature": 0.9, "seed": 3, "logprobs": 0}
    choice = post(served, "completions", body).json()["choices"][0]
    ids = local_engine_ids(loaded, Request(prompt, 10, temperature=0.9, seed=3))  # the same seeded draws here
    assert choice["logprobs"]["tokens"] == [token_text(loaded, t) for t in ids]
    ref = log_softmax(loaded, prompt + ids)
    expected = [ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids)]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-4)  # before temperature
    assert all(len(top) == 1 for top in choice["logprobs"]["top_logprobs"])  # logprobs 0: the chosen token only
    streamed = sse_json(served, "completions", body)
    assert [t for e in streamed if e["choices"] for t in e["choices"][0]["logprobs"]["tokens"]] == choice["logprobs"]["tokens"]


def local_engine_ids(loaded, request) -> list[int]:
    async def main():
        engine = Engine(loaded, EngineConfig(calibration_budget_s=0.0))
        try:
            return [t async for c in engine.generate(request) for t in c.token_ids]
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def test_echo_with_max_tokens_zero_scores_the_prompt(served, oai):
    """What lm-evaluation-harness's loglikelihood requests need."""
    loaded = served["loaded"]
    prompt = encode(loaded, PROMPT + " jumps over")
    out = oai.completions.create(model=TINY, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == loaded.tokenizer.decode(prompt)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(prompt)
    ref = log_softmax(loaded, prompt)
    assert choice.logprobs.tokens == [token_text(loaded, t) for t in prompt]
    assert choice.logprobs.token_logprobs[0] is None
    expected = [ref[i, t].item() for i, t in enumerate(prompt[1:])]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)

    text_prompt = oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=4, echo=True)
    plain = oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=4)
    assert text_prompt.choices[0].text == PROMPT + plain.choices[0].text
    assert text_prompt.choices[0].logprobs is None

    events = sse_json(served, "completions", {"model": TINY, "prompt": PROMPT, "max_tokens": 4, "echo": True})
    assert events[0]["choices"][0]["text"].startswith(PROMPT)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == text_prompt.choices[0].text


def test_chat_logprobs(served, oai):
    loaded = served["loaded"]
    messages = [{"role": "user", "content": "Say hello."}]
    out = oai.chat.completions.create(model=TINY, messages=messages, max_tokens=8, logprobs=True, top_logprobs=3)
    tok = loaded.tokenizer
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    ids = greedy_ids(loaded, prompt, 8)
    ref = log_softmax(loaded, prompt + ids)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [token_text(loaded, t) for t in ids]
    for i, (entry, token) in enumerate(zip(content, ids)):
        row = ref[len(prompt) - 1 + i]
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert [t.token for t in entry.top_logprobs] == [token_text(loaded, t) for t in row.topk(3).indices.tolist()]
    streamed = list(oai.chat.completions.create(model=TINY, messages=messages, max_tokens=8, logprobs=True, stream=True))
    tokens = [c.token for chunk in streamed if chunk.choices and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert tokens == [c.token for c in content]
    assert all(not c.top_logprobs for chunk in streamed if chunk.choices and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content)
    none = oai.chat.completions.create(model=TINY, messages=messages, max_tokens=4)
    assert none.choices[0].logprobs is None


# ---- several choices ----------------------------------------------------------------------


def test_a_batch_of_prompts_gives_one_choice_each(served, oai):
    loaded = served["loaded"]
    texts = ["one two three", "def f(x):", "Hello"]
    singles = [oai.completions.create(model=TINY, prompt=t, max_tokens=6).choices[0].text for t in texts]
    batch = oai.completions.create(model=TINY, prompt=texts, max_tokens=6)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == singles
    assert batch.usage.prompt_tokens == sum(len(encode(loaded, t)) for t in texts)

    token_batch = oai.completions.create(model=TINY, prompt=[encode(loaded, t) for t in texts], max_tokens=6)
    assert [c.text for c in token_batch.choices] == singles

    events = sse_json(served, "completions", {"model": TINY, "prompt": texts, "max_tokens": 6})
    streamed = {i: "".join(e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["index"] == i) for i in range(3)}
    assert [streamed[i] for i in range(3)] == singles
    finished = [e["choices"][0]["index"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2]
    assert "usage" in events[-1] and events[-1]["usage"]["prompt_tokens"] == batch.usage.prompt_tokens


def test_n_choices_greedy_and_seeded(served, oai):
    greedy = oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=8, n=2)
    single = oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=8)
    assert [c.text for c in greedy.choices] == [single.choices[0].text] * 2
    assert greedy.usage.completion_tokens == 2 * single.usage.completion_tokens
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once

    sampled = oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=11)
    alone = [oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11 + i) for i in range(3)]
    assert [c.text for c in sampled.choices] == [a.choices[0].text for a in alone]  # choice i samples with seed + i
    assert len({c.text for c in sampled.choices}) > 1

    messages = [{"role": "user", "content": "Hi"}]
    chat = oai.chat.completions.create(model=TINY, messages=messages, max_tokens=6, n=2, temperature=1.0, seed=5)
    stream = list(oai.chat.completions.create(model=TINY, messages=messages, max_tokens=6, n=2, temperature=1.0, seed=5, stream=True))
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices and c.choices[0].index == i)
        assert text == chat.choices[i].message.content
        assert sum(1 for c in stream if c.choices and c.choices[0].index == i and c.choices[0].delta.role) == 1


# ---- chat message shapes and token limits --------------------------------------------------


def test_max_completion_tokens_and_text_parts(served, oai):
    words = [{"role": "user", "content": "Say\nhello."}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello."}]}]
    a = oai.chat.completions.create(model=TINY, messages=words, max_completion_tokens=5)
    b = oai.chat.completions.create(model=TINY, messages=parts, max_completion_tokens=5, max_tokens=50)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert b.usage.completion_tokens == 5 or b.choices[0].finish_reason == "stop"


def plain_sampled_ids(loaded, prompt_ids: list[int], n: int, params) -> list[int]:
    """Plain decoding (no drafts) of the checkpoint in this process with these sampling params."""
    return generate(loaded, make_sequences(loaded, [prompt_ids], n), num_sat=0, sampling=[params])[0].output_ids


def test_penalties_and_top_k_shape_the_target_distribution(served, oai):
    """Penalties apply to greedy and sampled requests (the drafts are verified against the
    penalised distribution); top_k=1 at any temperature is greedy. Each equals plain decoding
    in this process with the same parameters (fp32: exactly)."""
    from sdsat.decode.target import SamplingParams

    loaded = served["loaded"]
    ids = encode(loaded, PROMPT)
    unpenalised = greedy_ids(loaded, ids, 24)
    for temperature, seed in ((0.0, None), (0.8, 5)):
        for name in ("presence_penalty", "frequency_penalty"):
            out = oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=24, temperature=temperature, seed=seed, **{name: 1.5})
            want = plain_sampled_ids(loaded, ids, 24, SamplingParams(temperature, 1.0, seed, **{name: 1.5}))
            assert out.choices[0].text == loaded.tokenizer.decode(want, skip_special_tokens=True)
            if temperature == 0:
                assert want != unpenalised  # the penalty changed the greedy answer
    top1 = oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=24, temperature=0.9, seed=3, extra_body={"top_k": 1})
    assert top1.choices[0].text == loaded.tokenizer.decode(unpenalised, skip_special_tokens=True)


# ---- every new field, streamed and not, greedy and sampled ----------------------------------

PARTS = [{"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]}]
CASES = [
    ("completions", {"prompt": PROMPT, "logprobs": 2}),
    ("completions", {"prompt": PROMPT, "echo": True, "logprobs": 1}),
    ("completions", {"prompt": ["one two", "three four"], "n": 2}),
    ("completions", {"prompt": [[3, 4, 5], [6, 7, 8, 9]], "logprobs": 0}),
    ("chat", {"messages": PARTS, "max_completion_tokens": 6, "logprobs": True, "top_logprobs": 2}),
    ("chat", {"messages": PARTS, "n": 2}),
]


def _text(kind: str, choice, streaming: bool) -> str:
    if kind == "completions":
        return choice.text
    return (choice.delta.content if streaming else choice.message.content) or ""


def _tokens(kind: str, choice) -> list[tuple[str, float]]:
    if choice.logprobs is None:
        return []
    if kind == "completions":
        return list(zip(choice.logprobs.tokens, choice.logprobs.token_logprobs))
    return [(c.token, c.logprob) for c in choice.logprobs.content]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("kind, fields", CASES)
def test_streaming_equals_whole_for_every_new_field(oai, kind, fields, temperature):
    create = oai.completions.create if kind == "completions" else oai.chat.completions.create
    args = {"model": TINY, "max_tokens": 8, "temperature": temperature, "seed": 5, **fields}
    whole = create(**args)
    chunks = list(create(**args, stream=True))
    expected = len(fields["prompt"]) if isinstance(fields.get("prompt"), list) and isinstance(fields["prompt"][0], (str, list)) else 1
    assert len(whole.choices) == expected * fields.get("n", 1)
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(_text(kind, c, True) for c in mine) == _text(kind, choice, False)
        assert [f for f in (c.finish_reason for c in mine) if f] == [choice.finish_reason]
        streamed = [t for c in mine for t in _tokens(kind, c)]
        assert [t for t, _ in streamed] == [t for t, _ in _tokens(kind, choice)]
        # Values to 1e-4: the scheduler may verify other drafts in each run, and passes of other
        # widths round differently in fp32 (the tokens are exactly the same).
        assert [lp for _, lp in streamed] == pytest.approx([lp for _, lp in _tokens(kind, choice)], abs=1e-4)
        if fields.get("logprobs") is not None and fields.get("logprobs") is not False:
            assert _tokens(kind, choice), "logprobs were asked for"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


# ---- fields the server does not implement ---------------------------------------------------


def test_neutral_values_of_unsupported_fields_are_accepted(served, oai):
    messages = [{"role": "user", "content": "Hi"}]
    base = oai.chat.completions.create(model=TINY, messages=messages, max_tokens=5)
    out = oai.chat.completions.create(
        model=TINY,
        messages=messages,
        max_tokens=5,
        response_format={"type": "text"},
        tools=[],
        tool_choice="none",
        logit_bias={},
        store=False,
        metadata={"a": "b"},
        parallel_tool_calls=False,
        user="someone",
    )
    assert out.choices[0].message.content == base.choices[0].message.content


@pytest.mark.parametrize(
    "route, field, value",
    [
        ("chat/completions", "response_format", {"type": "json_object"}),
        ("chat/completions", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("chat/completions", "tool_choice", "required"),
        ("chat/completions", "logit_bias", {"42": 5}),
        ("completions", "logit_bias", {"42": 5}),
        ("completions", "best_of", 3),
        ("completions", "suffix", "end"),
    ],
)
def test_result_changing_unsupported_fields_are_400(served, route, field, value):
    body = {"model": TINY, "max_tokens": 4, field: value}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if route.startswith("chat") else {"prompt": "Hi"})
    response = post(served, route, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"] and error["code"] == "unsupported_parameter"


def test_other_unknown_fields_are_ignored_with_a_warning(served, oai):
    import ray

    name = f"made_up_field_{int(time.time() * 1000)}"
    out = oai.completions.create(model=TINY, prompt="Hi", max_tokens=3, extra_body={name: 1})
    assert out.usage.completion_tokens > 0
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(f"ignoring unknown request fields: {name}" in p.read_text(errors="replace") for p in logs.glob("replica_*Router*.log")):
            return
        time.sleep(0.5)
    raise AssertionError(f"no warning naming {name} in the Router's logs under {logs}")


BAD = [
    ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
    ("completions", {"prompt": "x", "logprobs": "two"}, "logprobs"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "x", "echo": "loud"}, "echo"),
    ("completions", {"prompt": [[]]}, "prompt"),
    ("completions", {"prompt": ["a", ""]}, "prompt"),
    ("completions", {"prompt": [[1, 2], [10**9]]}, "prompt"),
    ("completions", {"prompt": [[1, 2], "mixed"]}, "prompt"),
    ("completions", {"prompt": ["a"] * 33, "n": 2}, "prompt"),
    ("completions", {"prompt": "x", "n": 0}, "n"),
    ("completions", {"prompt": "x", "n": 65}, "n"),
    ("completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ("completions", {"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 65}, "n"),
]


@pytest.mark.parametrize("route, body, fragment", BAD)
def test_bad_values_are_400_naming_the_field(served, route, body, fragment):
    response = post(served, route, {"model": TINY, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in (error["param"] or "") or fragment in error["message"], error
    assert error["type"] == "invalid_request_error"
