"""Acceptance: lm-evaluation-harness, as a user runs it, against the served default model.

The harness's ``local-completions`` model (its defaults: token-id prompts in batches, echo
with logprobs for loglikelihood) and ``local-chat-completions`` (with the chat template) run a
tiny local multiple-choice task and a tiny generate_until task (tests/lm_eval_tasks/) against
the Serve app this test starts (fp32, drafting on). The same tasks run through the harness's
own ``hf`` model on the same checkpoint. Tolerance: every loglikelihood within 1e-3 nats of
hf's (fp32; the server's passes have other shapes than hf's, so sums differ in the last bits),
the same greedy flags and accuracy, and every generated text identical (greedy decoding is
lossless: speculative drafts change nothing in fp32).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sdsat.model.default_model import default_checkpoint
from tests.serve_utils import free_port, start_ray_serve, stop_ray_serve, wait_healthy

pytestmark = pytest.mark.slow

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
MC, GEN = "sdsat_tiny_mc", "sdsat_tiny_gen"
LL_TOLERANCE = 1e-3
NAME = "sdsat-default"


@pytest.fixture(scope="module")
def served():
    from ray import serve

    from deployments.sdsat import build_app

    port = free_port()
    start_ray_serve(port)
    try:
        args = {"dtype": "float32", "cpus_per_replica": 1.0, "router_cpus": 0.05, "max_batch_size": 4}
        serve.run(build_app(args), name="default", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, timeout_s=300)
        yield base
    finally:
        stop_ray_serve()


@pytest.fixture(scope="module")
def harness():
    """lm_eval's evaluate function and task manager, and its hf model on the default checkpoint."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf = HFLM(pretrained=str(default_checkpoint()), dtype="float32", device="cpu", batch_size=1)
    return lm_eval.simple_evaluate, TaskManager(include_path=str(TASKS)), hf


def evaluate(harness, monkeypatch, model, tasks: list[str], model_args: str | None = None, chat: bool = False) -> dict:
    simple_evaluate, task_manager, _ = harness
    monkeypatch.chdir(TASKS)  # the tasks' data files are named relative to their folder
    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=task_manager,
        log_samples=True,
        apply_chat_template=chat,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        cache_requests=False,
    )


def api_args(base: str, route: str, **extra) -> str:
    args = {
        "model": NAME,
        "base_url": f"{base}/v1/{route}",
        "tokenizer": str(default_checkpoint()),
        "tokenizer_backend": "huggingface",
        "num_concurrent": 1,
        "max_retries": 1,
        "timeout": 600,
        **extra,
    }
    return ",".join(f"{k}={v}" for k, v in args.items())


def responses(results: dict, task: str) -> list:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_local_completions_equals_hf(served, harness, monkeypatch):
    hf = evaluate(harness, monkeypatch, harness[2], [MC, GEN])
    api = evaluate(harness, monkeypatch, "local-completions", [MC, GEN], api_args(served, "completions", batch_size=4))

    hf_mc, api_mc = responses(hf, MC), responses(api, MC)
    assert len(api_mc) == 5
    for hf_doc, api_doc in zip(hf_mc, api_mc):  # per doc, per choice: [(loglikelihood, is_greedy)]
        for (hf_ll, hf_greedy), (api_ll, api_greedy) in ((h[0], a[0]) for h, a in zip(hf_doc, api_doc)):
            assert api_ll == pytest.approx(hf_ll, abs=LL_TOLERANCE)
            assert api_greedy == hf_greedy
    assert api["results"][MC]["acc,none"] == hf["results"][MC]["acc,none"]
    assert api["results"][MC]["acc_norm,none"] == hf["results"][MC]["acc_norm,none"]

    hf_gen, api_gen = responses(hf, GEN), responses(api, GEN)
    assert all(r[0][0].strip() for r in api_gen)  # something was generated for every doc
    assert api_gen == hf_gen
    assert api["results"][GEN]["exact_match,none"] == hf["results"][GEN]["exact_match,none"]


def test_local_chat_completions_equals_hf(served, harness, monkeypatch):
    hf = evaluate(harness, monkeypatch, harness[2], [GEN], chat=True)
    api = evaluate(harness, monkeypatch, "local-chat-completions", [GEN], api_args(served, "chat/completions"), chat=True)
    hf_gen, api_gen = responses(hf, GEN), responses(api, GEN)
    assert all(r[0][0].strip() for r in api_gen)
    assert api_gen == hf_gen
    assert api["results"][GEN]["exact_match,none"] == hf["results"][GEN]["exact_match,none"]
