"""The committed distillation prompt sets (configs/data/*prompts*.json): well-formed, within
the default model's vocabulary, and holding none of the benchmark prompts, so acceptance
measured on jobs/data/mixed_prompts.jsonl is on prompts the recipes never saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdsat.training.distill import read_prompts

FILES = sorted(Path("configs/data").glob("*prompts*.json"))
VOCAB = 49152  # the default model's


@pytest.fixture(scope="module")
def default_tokenizer():
    from transformers import AutoTokenizer

    from sdsat.model.load import resolve_path

    return AutoTokenizer.from_pretrained(resolve_path("default-base"))


def _bench_lines() -> set[str]:
    lines = set()
    for line in open("jobs/data/mixed_prompts.jsonl"):
        lines |= {text.strip() for text in json.loads(line)["prompt"].splitlines() if len(text.strip()) >= 24}
    return lines


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_prompt_set_is_well_formed_and_unseen(path, default_tokenizer):
    prompts = read_prompts(str(path))
    assert all(0 <= t < VOCAB for p in prompts for t in p)
    assert len({tuple(p) for p in prompts}) == len(prompts)  # no prompt twice
    bench = _bench_lines()
    texts = [default_tokenizer.decode(p) for p in prompts]
    lines = {line.strip() for text in texts for line in text.splitlines() if "<|im_" not in line}  # not the chat template's
    shared = lines & bench
    assert not shared, f"{path.name} holds benchmark lines: {sorted(shared)[:3]}"


def test_more_prompt_sets_do_not_repeat_the_earlier_ones():
    for first, more in (("artifact_prompts", "code_prompts_more"), ("chat_prompts", "chat_prompts_more"),
                        ("genre_prompts", "genre_prompts_more"), ("chat_prompts", "chat_prompts_second"),
                        ("chat_prompts_more", "chat_prompts_second"), ("chat_prompts", "chat_prompts_third"),
                        ("chat_prompts_more", "chat_prompts_third"), ("chat_prompts_second", "chat_prompts_third")):
        a = {tuple(p) for p in read_prompts(f"configs/data/{first}.json")}
        b = {tuple(p) for p in read_prompts(f"configs/data/{more}.json")}
        assert b and not a & b, (first, more)
