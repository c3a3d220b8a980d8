"""Helpers for the Serve tests: a tiny random checkpoint with a real tokenizer, a local Ray + Serve."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sdsat.model.default_model import default_checkpoint
from sdsat.model.load import LoadedModel, save_model
from sdsat.model.sat import add_sat_tokens


def make_tiny_checkpoint(directory: Path, k: int = 4, seed: int = 0, context: int = 512, nan_head: bool = False) -> Path:
    """A 2-layer random Llama with the default model's tokenizer (and chat template) and k SATs.

    nan_head: poison the LM head with NaN (a corrupt checkpoint: sampling from it raises
    inside the engine; greedy argmax still runs).
    """
    tokenizer = AutoTokenizer.from_pretrained(default_checkpoint())
    tokenizer.model_max_length = context
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        initializer_range=0.1,  # larger logits: fewer fp near-ties between batched and single decoding
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    sat = add_sat_tokens(model, tokenizer, k, base_model="tiny-random-llama")
    if nan_head:
        with torch.no_grad():
            model.get_output_embeddings().weight.fill_(float("nan"))
    return save_model(LoadedModel(model=model, tokenizer=tokenizer, sat=sat, source="tiny", path=""), directory)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ray_serve(port: int, num_cpus: int = 4, metrics_export_port: int | None = None) -> None:
    """A fresh local Ray cluster (never an existing one) and Serve's HTTP proxy on this port.

    num_cpus is logical: replicas ask for fractions of it, so several apps fit 2 real cores.
    """
    import ray
    from ray import serve

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_export_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def stop_ray_serve() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def wait_healthy(base_url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"{base_url}/health", timeout=10)
            if last.status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/health never became ready: {last!r}")
