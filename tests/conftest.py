"""Shared fixtures: tiny random models (fast) and the embedded default model (slow)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sdsat.model.load import LoadedModel, load_model
from sdsat.model.sat import SATConfig

TINY_VOCAB = 256


class TinyTokenizer:
    """Enough of a tokenizer for decoding tests on random models: ids are bytes."""

    pad_token_id = 0
    eos_token_id = None
    pad_token = "<pad>"
    eos_token = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("latin-1"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("latin-1")


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = TINY_VOCAB, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    return model.eval()


def tiny_loaded(arch: str = "llama", k: int = 8, seed: int = 0) -> LoadedModel:
    """A tiny random model whose last k vocabulary ids serve as (untrained) SATs."""
    model = tiny_model(arch, seed)
    sat_ids = list(range(TINY_VOCAB - k, TINY_VOCAB))
    sat = SATConfig(sat_ids=sat_ids, sat_tokens=[f"<sat_{i}>" for i in range(1, k + 1)])
    return LoadedModel(model=model, tokenizer=TinyTokenizer(), sat=sat, source=f"tiny-{arch}", path="")


def hf_greedy(loaded: LoadedModel, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy generate of n tokens, SATs suppressed, EOS disabled."""
    out = loaded.model.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        suppress_tokens=loaded.sat.unique_ids,
        eos_token_id=None,
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    return out[0, len(prompt) :].tolist()


def train_frozen(model, batch, cfg, params, owner: str, steps: int = 40) -> tuple[dict, dict]:
    """Adam steps of the frozen-base loss on one batch over ``params``; checks at the first
    step that every gradient lands on parameters named with ``owner`` (and is finite).
    Returns the first and the last step's metrics."""
    from sdsat.training.frozen_loss import frozen_loss

    params = list(params)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    first = metrics = None
    for _ in range(steps):
        loss, metrics = frozen_loss(model, batch, cfg)
        optimizer.zero_grad()
        loss.backward()
        if first is None:
            first = metrics
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
            assert all(p.grad is None for n, p in model.named_parameters() if owner not in n)
        optimizer.step()
    return first, metrics


@pytest.fixture(scope="session")
def default_fp32() -> LoadedModel:
    """The embedded default model without its shipped SAT artifact ("default-base"), in fp32,
    with 8 untrained SATs (tests/test_default_artifact.py covers the artifact)."""
    return load_model("default-base", dtype="float32", add_sat=8)


def single_torch_thread():
    """Fixture body: tiny models run faster on one thread than two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
