"""Serving items that matter most on GPUs, checked on CPU: masks that let SDPA use its fused
kernels (same logits as the dense mask), chunked prefill, the KV-memory budget for admission,
GPUs per replica decided from the app's arguments, and the API-key rule beyond loopback."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from deployments.exposure import check_exposure, is_loopback
from deployments.sdsat import AppArgs, build_app
from deployments.server import replica_device
from sdsat.decode.decoding import forward, plain_step, prefill
from sdsat.decode.generate import generate, make_sequences
from sdsat.decode.kv_cache import SlotCache
from sdsat.engine.engine import Engine, EngineConfig, Request
from sdsat.engine.kv_budget import KVBudget
from tests.conftest import tiny_loaded, tiny_model, single_torch_thread

RAGGED = [[5, 9, 13, 2, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [8, 8, 8]]


one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)


def passes(model, prompts, dense: bool):
    """Prefill, two plain steps and one 5-token causal pass; the logits of each pass.
    dense=True forces the old path: an explicit additive float mask on every pass."""
    cache = SlotCache.for_model(model, len(prompts))
    causal = (lambda q: torch.ones(q, q, dtype=torch.bool).tril()) if dense else (lambda q: None)
    if dense:
        cache.bool_mask = False
    last = prefill(model, cache, prompts, pad_id=0)
    out = []
    for _ in range(2):
        logits = forward(model, cache, last[:, None], block_mask=causal(1))
        cache.advance(1)
        out.append(logits)
        last = logits[:, 0].argmax(-1)
    block = torch.stack([last, (last + 1) % 200, (last + 2) % 200, last, last], dim=1)  # [B, 5]
    out.append(forward(model, cache, block, block_mask=causal(5)))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prompts", [RAGGED, [RAGGED[0], RAGGED[0]], [RAGGED[1]]], ids=["ragged", "uniform", "one"])
def test_sdpa_friendly_masks_give_the_dense_mask_logits(attn, prompts):
    model = tiny_model("llama", seed=3)
    model.set_attn_implementation(attn)
    with torch.inference_mode():
        fast, dense = passes(model, prompts, dense=False), passes(model, prompts, dense=True)
    for a, b in zip(fast, dense):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_mask_kinds():
    model = tiny_model("llama")
    cache = SlotCache.for_model(model, 2)
    assert cache.bool_mask  # the tiny model runs SDPA
    assert cache.prepare(4, torch.float32) is None  # equal rows, causal block: the model's own mask
    cache.advance([3, 5])
    mask = cache.prepare(2, torch.float32)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 2, 7)
    assert mask[0, 0, 0].tolist() == [True, True, True, True, False, False, False]  # row 0: 3 past + itself
    assert mask[1, 0, 1].tolist() == [True] * 7
    model.set_attn_implementation("eager")
    eager = SlotCache.for_model(model, 2)
    eager.advance([3, 5])
    assert eager.prepare(2, torch.float32).dtype == torch.float32  # eager adds the mask: additive


def test_pass_time_is_counted():
    model = tiny_model("llama")
    cache = SlotCache.for_model(model, 1)
    with torch.inference_mode():
        prefill(model, cache, [RAGGED[1]], pad_id=0)
    assert cache.forward_seconds > 0


def test_chunked_prefill_equals_one_pass():
    model = tiny_model("llama", seed=1)
    prompts = [list(range(3, 40)), list(range(50, 61)), [7, 7]]
    results = []
    with torch.inference_mode():
        for chunk in (4, 512):
            cache = SlotCache.for_model(model, len(prompts))
            hidden = []  # the prompt's hidden states, for prompt log-probabilities: whole, however chunked
            last = prefill(model, cache, prompts, pad_id=0, on_hidden=hidden.append, chunk=chunk)
            steps = []
            for _ in range(6):
                last = plain_step(model, cache, last, None)
                steps.append(last.tolist())
            results.append((cache.lengths, cache.layers[0].keys[:, :, :36], steps, hidden))
    (lengths_a, keys_a, steps_a, hidden_a), (lengths_b, keys_b, steps_b, hidden_b) = results
    assert lengths_a == lengths_b
    assert torch.allclose(keys_a[0], keys_b[0], atol=1e-5)  # the longest row's committed keys
    assert steps_a == steps_b
    assert len(hidden_a) == len(hidden_b) == 1 and hidden_a[0].shape == hidden_b[0].shape == (3, 36, 64)
    assert torch.allclose(hidden_a[0][0], hidden_b[0][0], atol=1e-5)


def test_kv_budget_arithmetic():
    model = tiny_model("llama")  # 2 layers, 2 KV heads of 16 dims, fp32
    budget = KVBudget.for_model(model, budget_bytes=2 * 256 * 512, room=9)
    assert budget.bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert budget.row_tokens(10, 20) == 39
    assert budget.fits([39], 39) and not budget.fits([39, 39], 39)
    assert not budget.fits([39], 300)  # rows share the longest one's capacity: 2 x 512 slots
    assert KVBudget.for_model(model).budget_bytes is None  # CPU: no limit unless configured
    with pytest.raises(ValueError, match="KV budget"):
        KVBudget.for_model(model, budget_bytes=1000).check_alone(39)


def test_engine_admits_only_what_the_kv_budget_holds():
    loaded = tiny_loaded("llama", k=8)
    prompts = [[(5 * i + j) % 200 + 3 for j in range(4 + i)] for i in range(5)]
    steps = []

    async def body(engine):
        async def one(p):
            return [t for c in [c async for c in engine.generate(Request(p, 12))] for t in c.token_ids]

        return await asyncio.gather(*[one(p) for p in prompts])

    async def main():
        # Each request needs < 256 slots (one capacity step) of 512 bytes: the budget holds two rows.
        engine = Engine(loaded, EngineConfig(num_sat=4, kv_budget_bytes=2 * 256 * 512 + 100), steps.append)
        try:
            with pytest.raises(ValueError, match="KV budget"):
                engine.validate(Request(prompts[0], 600))  # alone it needs a second capacity step
            return await body(engine)
        finally:
            await engine.shutdown()

    outputs = asyncio.run(main())
    assert max(s.batch_size for s in steps) == 2
    for prompt, out in zip(prompts, outputs):
        assert out == generate(loaded, make_sequences(loaded, [prompt], 12), num_sat=4)[0].output_ids


def test_gpus_per_replica_comes_from_the_arguments():
    from ray.serve._private.build_app import build_app as built

    def gpus(app):
        return {d.name: d.ray_actor_options.get("num_gpus", 0) for d in built(app, name="a").deployments}

    assert gpus(build_app({"gpus_per_replica": 1}))["SDSATServer"] == 1  # this machine has no GPU
    assert gpus(build_app({}))["SDSATServer"] == 0
    with pytest.raises(ValidationError, match="one GPU"):
        AppArgs.model_validate({"gpus_per_replica": 2})


def test_a_gpu_replica_without_cuda_fails_clearly():
    assert replica_device(0) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA device"):
            replica_device(1)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True), (None, True),
                                            ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("myhost", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_beyond_loopback_needs_a_key_or_a_logged_opt_out(caplog):
    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", "secret", False)
    with pytest.raises(ValueError, match="beyond loopback"):
        check_exposure("0.0.0.0", None, False)
    with caplog.at_level(logging.WARNING, logger="deployments.exposure"):
        check_exposure("0.0.0.0", None, True)
    assert "WITHOUT an API key" in caplog.text


@pytest.mark.slow
def test_cluster_config_deploys_only_with_its_key(tmp_path, monkeypatch):
    """configs/serve_cluster.yaml deployed as `serve deploy` does (Serve on 0.0.0.0): refused
    without a key; with the key in runtime_env.env_vars it serves, and only to that key."""
    import time

    import httpx
    import ray
    import yaml
    from ray import serve
    from ray.serve._private.api import serve_start  # what `serve run <config>` calls
    from ray.serve.schema import ServeDeploySchema

    from tests.serve_utils import free_port, make_tiny_checkpoint

    monkeypatch.delenv("SDSAT_API_KEY", raising=False)
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "serve_cluster.yaml").read_text())
    config["http_options"]["port"] = port = free_port()
    app = config["applications"][0]
    app["args"].update(model=str(make_tiny_checkpoint(tmp_path / "tiny")), gpus_per_replica=0, cpus_per_replica=0.1,
                       router_cpus=0.05, dtype="float32", max_replicas=1, calibration_budget_s=0)

    def deploy():
        client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = serve.status().applications.get("sdsat")
            if status is not None and status.status in ("RUNNING", "DEPLOY_FAILED"):
                return status
            time.sleep(1)
        raise TimeoutError("the app never finished deploying")

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        client = serve_start(http_options=config["http_options"])
        refused = deploy()
        assert refused.status == "DEPLOY_FAILED" and "beyond loopback" in refused.message
        app["runtime_env"] = {"env_vars": {"SDSAT_API_KEY": "the-key"}}
        assert deploy().status == "RUNNING"
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url, timeout=60).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer the-key"}, timeout=60).status_code == 200
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_compiled_decode_gives_the_same_tokens():
    """torch.compile works on this CPU (inductor + a C++ compiler), so the compiled path is
    checked here for equality; it is meant for GPUs (compiling takes minutes on 2 cores)."""
    from sdsat.decode.compiled import compile_decode

    loaded = tiny_loaded("llama", k=4)
    prompts = RAGGED[:2]
    plain = [s.output_ids for s in generate(loaded, make_sequences(loaded, prompts, 10), num_sat=0)]
    compile_decode(loaded.model)
    sdsat = [s.output_ids for s in generate(loaded, make_sequences(loaded, prompts, 10), 4, two_step=True)]
    assert sdsat == plain
    with pytest.raises(ValueError, match="not supported"):
        compile_decode(loaded.model, mode="reduce-overhead")


@pytest.mark.slow
def test_default_model_chunked_prefill_matches_transformers_generate(default_fp32):
    """A prompt longer than one prefill chunk (512 tokens) decodes exactly as transformers does."""
    from sdsat.decode.decoding import PREFILL_CHUNK
    from tests.conftest import hf_greedy

    text = Path(__file__).read_text()
    prompt = default_fp32.tokenizer.encode(text)[: PREFILL_CHUNK + 150]
    assert len(prompt) > PREFILL_CHUNK + 100
    (seq,) = generate(default_fp32, make_sequences(default_fp32, [prompt], 16, eos=False), num_sat=4)
    assert seq.output_ids == hf_greedy(default_fp32, prompt, 16)
