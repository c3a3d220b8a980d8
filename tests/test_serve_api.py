"""The Serve app over real HTTP on a real local Ray cluster: OpenAI API, streaming, batching,
bad input, auth, client disconnects, engine failures, Prometheus metrics, the default model.

One cluster and four apps for the whole module: a tiny random model in fp32 at "/", the same
behind an API key at "/auth", a corrupt (NaN) checkpoint at "/faulty", the default app at "/default".
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from sdsat.decode.generate import generate, make_sequences
from sdsat.model.load import load_model
from tests.serve_utils import free_port, make_tiny_checkpoint, start_ray_serve, stop_ray_serve, wait_healthy

pytestmark = pytest.mark.slow

TINY = "tiny"
LIMIT = 256
KEY = "test-secret-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ray import serve

    from deployments.sdsat import app as default_app
    from deployments.sdsat import build_app

    root = tmp_path_factory.mktemp("serve_api")
    tiny = make_tiny_checkpoint(root / "tiny")
    faulty = make_tiny_checkpoint(root / "faulty", nan_head=True)
    port, metrics_port = free_port(), free_port()
    start_ray_serve(port, metrics_export_port=metrics_port)
    common = {"dtype": "float32", "model_name": TINY, "max_tokens_limit": LIMIT, "router_cpus": 0.05}
    try:
        serve.run(build_app({"model": str(tiny), "cpus_per_replica": 0.5, **common}), name="tiny", route_prefix="/")
        serve.run(build_app({"model": str(tiny), "cpus_per_replica": 0.1, "torch_threads": 2, "api_key": KEY, **common}), name="auth", route_prefix="/auth")
        serve.run(build_app({"model": str(faulty), "cpus_per_replica": 0.1, **common}), name="faulty", route_prefix="/faulty")
        serve.run(default_app, name="default", route_prefix="/default")
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        yield {"base": base, "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "loaded": load_model(str(tiny))}
    finally:
        stop_ray_serve()


def stats(app_name: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("SDSATServer", app_name=app_name).stats.remote().result()


def reference_text(loaded, prompt_ids: list[int], max_tokens: int) -> str:
    """Plain greedy decoding of the same checkpoint in this process (the reference decoder)."""
    seq = generate(loaded, make_sequences(loaded, [prompt_ids], max_tokens), num_sat=0)[0]
    return seq.text(loaded.tokenizer)


def client(base: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_completion_matches_plain_greedy(served):
    prompt = "def add(a, b):"
    out = client(served["base"]).completions.create(model=TINY, prompt=prompt, max_tokens=24, temperature=0)
    loaded = served["loaded"]
    ids = loaded.tokenizer.encode(prompt)
    assert out.choices[0].text == reference_text(loaded, ids, 24)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == len(ids)
    assert 0 < out.usage.completion_tokens <= 24
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    info = out.model_extra["sdsat"]
    assert info["mode"] in ("sdsat", "plain")
    assert info["iterations"] > 0 and info["tau"] >= 1.0


def test_openai_chat_uses_the_chat_template(served):
    messages = [{"role": "user", "content": "Say hello."}]
    out = client(served["base"]).chat.completions.create(model=TINY, messages=messages, max_tokens=12)
    tok = served["loaded"].tokenizer
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference_text(served["loaded"], ids, 12)
    assert out.usage.prompt_tokens == len(ids)
    assert out.object == "chat.completion"


def test_streaming_equals_non_streaming(served):
    oai = client(served["base"])
    whole = oai.completions.create(model=TINY, prompt="Once upon a time", max_tokens=30)
    chunks = list(oai.completions.create(model=TINY, prompt="Once upon a time", max_tokens=30, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].model_extra["sdsat"]["mode"] in ("sdsat", "plain")  # the scheduler decides

    messages = [{"role": "user", "content": "Tell me a story."}]
    chat_whole = oai.chat.completions.create(model=TINY, messages=messages, max_tokens=20)
    chat_chunks = list(oai.chat.completions.create(model=TINY, messages=messages, max_tokens=20, stream=True))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == chat_whole.choices[0].message.content

    body = {"model": TINY, "prompt": "x", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{served['base']}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    usage_only = json.loads(lines[-2].removeprefix("data: "))
    assert usage_only["choices"] == [] and usage_only["usage"]["completion_tokens"] >= 1


def test_models_and_health(served):
    models = client(served["base"]).models.list()
    assert [m.id for m in models.data] == [TINY]
    assert models.data[0].model_extra["num_sat"] == 4 and models.data[0].model_extra["dtype"] == "float32"
    health = httpx.get(f"{served['base']}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_num_sat_zero_is_plain_and_sampling_says_so(served):
    oai = client(served["base"])
    greedy = oai.completions.create(model=TINY, prompt="abc", max_tokens=16)
    plain = oai.completions.create(model=TINY, prompt="abc", max_tokens=16, extra_body={"num_sat": 0})
    assert plain.model_extra["sdsat"]["mode"] == "plain" and plain.model_extra["sdsat"]["drafted"] == 0
    assert plain.choices[0].text == greedy.choices[0].text
    sampled = [oai.completions.create(model=TINY, prompt="abc", max_tokens=16, temperature=0.9, seed=7) for _ in range(2)]
    assert all(s.model_extra["sdsat"]["mode"] == "sampling" for s in sampled)
    assert sampled[0].choices[0].text == sampled[1].choices[0].text  # same seed, same text


def test_stop_strings_cut_the_text(served):
    loaded = served["loaded"]
    full = reference_text(loaded, loaded.tokenizer.encode("Once upon a time"), 40)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    out = client(served["base"]).completions.create(model=TINY, prompt="Once upon a time", max_tokens=40, stop=[stop])
    assert out.choices[0].text == full[: full.find(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_concurrent_requests_batch_and_match_sequential(served):
    base = served["base"]
    prompts = [f"Item {i}: the {'quick ' * (i % 5)}brown fox number {i * 7}" for i in range(16)]

    def complete(prompt: str) -> str:
        body = {"model": TINY, "prompt": prompt, "max_tokens": 48, "temperature": 0}
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    one_at_a_time = [complete(p) for p in prompts]
    before = stats("tiny")["replica"]["steps_by_batch_size"]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(complete, prompts))
    after = stats("tiny")["replica"]["steps_by_batch_size"]
    assert together == one_at_a_time
    batched_steps = sum(n - before.get(size, 0) for size, n in after.items() if size > 1)
    assert batched_steps > 0, f"no step decoded more than one request: {after}"


BAD_COMPLETIONS = [
    ('{"model": "tiny", "prompt": ', 400, None, "JSON"),
    ("[1, 2]", 400, None, "dictionary"),
    ("", 400, None, "missing"),
    ({"prompt": "x"}, 400, "model", "model"),
    ({"model": TINY}, 400, "prompt", "prompt"),
    ({"model": TINY, "prompt": 5}, 400, "prompt", "prompt"),
    ({"model": TINY, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "integer"),
    ({"model": TINY, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"model": TINY, "prompt": "x", "max_tokens": -3}, 400, "max_tokens", "max_tokens"),
    ({"model": TINY, "prompt": "x", "max_tokens": LIMIT + 1}, 400, "max_tokens", str(LIMIT)),
    ({"model": TINY, "prompt": "hello " * 600}, 400, "prompt", "context"),
    ({"model": TINY, "prompt": ""}, 400, "prompt", "empty"),
    ({"model": TINY, "prompt": [10**9]}, 400, "prompt", "vocabulary"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "gpt-4"),
    ({"model": TINY, "prompt": "x", "n": 0}, 400, "n", "n"),
    ({"model": TINY, "prompt": "x", "best_of": 3}, 400, "best_of", "best_of"),
    ({"model": TINY, "prompt": "x", "temperature": 5}, 400, "temperature", "temperature"),
    ({"model": TINY, "prompt": "x", "num_sat": 99}, 400, "num_sat", "num_sat"),
    ({"model": TINY, "prompt": "x", "num_sat": -1}, 400, "num_sat", "num_sat"),
    ({"model": TINY, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "stop"),
    ({"model": TINY, "prompt": "x", "stream": "yes please"}, 400, "stream", "stream"),
    ({"model": TINY, "prompt": "x", "temperature": 1, "seed": 2**64}, 400, "seed", "seed"),
]
BAD_CHATS = [
    ({"model": TINY}, 400, "messages", "messages"),
    ({"model": TINY, "messages": "hi"}, 400, "messages", "messages"),
    ({"model": TINY, "messages": []}, 400, "messages", "messages"),
    ({"model": TINY, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "role"),
    ({"model": TINY, "messages": [{"role": "user", "content": "hello " * 600}]}, 400, "messages", "context"),
    ({"model": TINY, "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n", "n"),
    ({"model": TINY, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 1}}, 400, "logit_bias", "logit_bias"),
]


@pytest.mark.parametrize(
    "route,case", [("completions", c) for c in BAD_COMPLETIONS] + [("chat/completions", c) for c in BAD_CHATS]
)
def test_bad_input_gets_openai_error(served, route, case):
    body, status, param, fragment = case
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(
        f"{served['base']}/v1/{route}", content=content, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert fragment.lower() in error["message"].lower()
    assert error["type"] == "invalid_request_error"


def test_server_healthy_after_bad_input(served):
    for body in ("{", "[]", json.dumps({"model": TINY, "prompt": "x", "max_tokens": 10**6})):
        httpx.post(f"{served['base']}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert httpx.get(f"{served['base']}/health", timeout=30).status_code == 200
    assert client(served["base"]).completions.create(model=TINY, prompt="still fine", max_tokens=4).usage.completion_tokens > 0


def test_torch_threads_reach_the_replica(served):
    # Ray gives a replica with under one CPU one OpenMP thread; torch_threads overrides that
    # (jobs/demo.py sets its replica's threads this way).
    assert stats("tiny")["engine"]["torch_threads"] == 1
    assert stats("auth")["engine"]["torch_threads"] == 2


def test_api_key(served):
    base = f"{served['base']}/auth"
    body = {"model": TINY, "prompt": "hi", "max_tokens": 4}
    missing = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/v1/models", timeout=60).status_code == 401
    assert httpx.post(f"{base}/v1/completions", content="{", timeout=60).status_code == 401  # auth before parsing
    assert httpx.get(f"{base}/health", timeout=60).status_code == 200  # probes need no key
    for path in ("/v1/health", "/x/health", "/health/", "/v1/models/health"):  # only the health route itself
        assert httpx.get(f"{base}{path}", timeout=60).status_code == 401, path
    out = client(base, KEY).completions.create(**body)
    assert out.usage.completion_tokens > 0


def test_engine_failure_fails_only_that_request(served):
    base = f"{served['base']}/faulty"
    body = {"model": TINY, "prompt": "x", "max_tokens": 8}
    # The checkpoint's LM head is NaN: sampling raises inside the engine's decode step.
    failed = httpx.post(f"{base}/v1/completions", json={**body, "temperature": 1.0}, timeout=60)
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error"
    assert failed.json()["error"]["code"] == "engine_error"
    # The same replica goes on serving (greedy argmax does not raise on NaN).
    ok = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert ok.status_code == 200, ok.text
    assert stats("faulty")["replica"]["finished"].get("error") == 1


def _wait_cancelled(app_name: str, cancelled_before: int, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snap = stats(app_name)
        if snap["engine"]["running"] == 0 and snap["engine"]["totals"].get("cancelled", 0) > cancelled_before:
            return snap
        time.sleep(0.5)
    raise AssertionError(f"request was not cancelled: {stats(app_name)}")


def test_client_disconnect_cancels_the_request(served):
    base = f"{served['base']}/default"
    body = {"model": "sdsat-default", "prompt": "Write a long essay about rivers.", "max_tokens": 1500}
    before = stats("default")
    cancelled = before["engine"]["totals"].get("cancelled", 0)
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data: "))
    snap = _wait_cancelled("default", cancelled)
    assert snap["replica"]["finished"].get("length", 0) == before["replica"]["finished"].get("length", 0)
    # A non-streaming request whose client gives up is cancelled too.
    cancelled = snap["engine"]["totals"]["cancelled"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base}/v1/completions", json=body, timeout=3)
    _wait_cancelled("default", cancelled)


def test_default_model_completion(served):
    oai = client(f"{served['base']}/default")
    card = oai.models.list().data[0]
    assert card.id == "sdsat-default" and card.model_extra["context_length"] == 8192
    out = oai.completions.create(model="sdsat-default", prompt="def fibonacci(n):", max_tokens=16)
    assert out.choices[0].text.strip()
    assert out.usage.completion_tokens == 16 or out.choices[0].finish_reason == "stop"
    assert out.model_extra["sdsat"]["iterations"] > 0


def test_default_model_accepts_drafts_on_text_that_repeats_itself(served):
    """Greedy and sampled requests whose answer repeats their prompt (a rename in code): once the
    replica has measured its pass costs, the scheduler verifies lookup drafts and they are accepted."""
    deadline = time.monotonic() + 600
    while stats("default")["engine"]["calibration_s"] is None:
        assert time.monotonic() < deadline, "the replica never finished measuring its pass costs"
        time.sleep(1)
    code = "def total(items):\n    x = 0\n    for item in items:\n        x += item.price * item.count\n    return x\n"
    prompt = f"# Rename x to s.\n\n{code}\n\n# After the rename:\n\n"
    oai = client(f"{served['base']}/default")
    infos = [oai.completions.create(model="sdsat-default", prompt=prompt, max_tokens=48).model_extra["sdsat"] for _ in range(3)]
    last = infos[-1]  # the scheduler learns acceptance across requests
    assert last["mode"] == "sdsat" and last["drafted"] > 0
    assert last["accepted"] > 0 and last["tau"] > 1.0
    # (A seed repeats exactly where logits do, in fp32: test_num_sat_zero_is_plain_and_sampling_says_so.
    # This app runs bf16, where a pass over other drafts rounds the logits differently.)
    sampled = oai.completions.create(model="sdsat-default", prompt=prompt, max_tokens=48, temperature=0.3, seed=11)
    info = sampled.model_extra["sdsat"]
    assert info["mode"] == "sampling" and info["drafted"] > 0 and info["accepted"] > 0


def test_prometheus_metrics_exported(served):
    wanted = [
        "ray_sdsat_requests_total",
        "ray_sdsat_generated_tokens_total",
        "ray_sdsat_spec_decode_num_draft_tokens_total",
        "ray_sdsat_spec_decode_num_draft_tokens_per_pos_total",
        "ray_sdsat_spec_decode_num_accepted_tokens_per_pos_total",
        "ray_sdsat_tau_bucket",
        "ray_sdsat_step_batch_size_bucket",
        "ray_sdsat_queue_length",
        "ray_sdsat_step_seconds_bucket",
    ]
    deadline, missing = time.monotonic() + 60, wanted
    while time.monotonic() < deadline and missing:
        text = httpx.get(served["metrics"], timeout=30).text
        missing = [name for name in wanted if name not in text]
        time.sleep(1)
    assert not missing, f"metrics not exported: {missing}"
    assert 'deployment="SDSATServer"' in text
    assert 'source="sat"' in text and 'position="1"' in text


def test_load_test_job(served, tmp_path):
    from jobs.load_test import main

    out = tmp_path / "load.json"
    argv = ["--url", served["base"], "--concurrency", "1,2", "--requests", "3", "--max-tokens", "8", "--prompts", "builtin"]
    report = main([*argv, "--json", str(out)])
    rows = report["results"]
    assert [(r["concurrency"], r["mode"]) for r in rows] == [(1, "plain"), (1, "sdsat"), (2, "plain"), (2, "sdsat")]
    assert [r["num_sat"] for r in rows] == [0, 4, 0, 4]
    for row in rows:
        assert row["errors"] == 0 and row["requests"] == 3
        assert row["output_tokens"] > 0 and row["tokens_per_s"] > 0
        assert row["ttft_p50_s"] is not None and row["ttft_p99_s"] >= row["ttft_p50_s"]
    assert json.loads(out.read_text())["speedup"].keys() == {"1", "2"}


def test_deleting_an_app_stops_its_engine(served, tmp_path):
    """Serve calls the replica's shutdown hook, which stops the engine thread (its log says so)."""
    import ray
    from ray import serve

    from deployments.sdsat import build_app

    tiny = make_tiny_checkpoint(tmp_path / "victim")
    args = {"model": str(tiny), "dtype": "float32", "model_name": TINY, "cpus_per_replica": 0.1, "router_cpus": 0.05}
    serve.run(build_app(args), name="victim", route_prefix="/victim")
    assert client(f"{served['base']}/victim").completions.create(model=TINY, prompt="x", max_tokens=2).usage.completion_tokens
    serve.delete("victim")
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any("SDSATServer shut down: engine stopped" in p.read_text(errors="replace") for p in logs.glob("replica_victim_SDSATServer_*.log")):
            return
        time.sleep(0.5)
    raise AssertionError(f"no replica of the deleted app logged its engine stopping ({sorted(p.name for p in logs.glob('replica_victim*'))})")
