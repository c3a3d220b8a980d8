"""Training data: the stdlib corpus and its split, local files, hub errors, chat, packing, self-distillation."""

from __future__ import annotations

import json
import logging

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sdsat.training.data import _hub_records, load_texts, pack, pack_ids, self_distill, split_records, stdlib_files
from tests.conftest import tiny_loaded

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A real (small) byte-level BPE tokenizer trained here, with EOS and a chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [p.read_text() for p in stdlib_files("train")[:20]]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_stdlib_split_is_deterministic_disjoint_and_by_file():
    train, val = stdlib_files("train"), stdlib_files("validation")
    assert train == stdlib_files("train") and val == stdlib_files("validation")
    assert not set(train) & set(val)
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.1
    assert all(p.suffix == ".py" for p in train + val)
    assert not any({"test", "tests", "site-packages"} & set(p.parts) for p in train + val)
    assert len(stdlib_files("validation", val_fraction=0.5)) > len(val)


def test_load_texts_stdlib_limit_and_errors():
    texts = load_texts("stdlib", "train", limit=5)
    assert len(texts) == 5 and all(t.strip() for t in texts)
    assert texts == [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files("train")[:5]]
    assert texts[0] not in load_texts("stdlib", "validation", limit=50)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_texts("stdlib", "dev")
    with pytest.raises(ValueError, match="limit"):
        load_texts("stdlib", "train", limit=0)
    with pytest.raises(ValueError, match="val_fraction"):
        stdlib_files("train", val_fraction=1.0)


def test_pack_rows_are_the_token_stream_cut_to_row_len(tokenizer):
    texts = load_texts("stdlib", "train", limit=3)
    ds = pack(texts, tokenizer, 64)
    assert isinstance(ds, datasets.Dataset) and ds.column_names == ["input_ids"]
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(ds) == len(stream) // 64 > 0
    assert all(len(row) == 64 for row in ds["input_ids"])
    assert [t for row in ds["input_ids"] for t in row] == stream[: len(ds) * 64]


def test_pack_refuses_bad_sizes(tokenizer):
    with pytest.raises(ValueError, match="row_len"):
        pack(["x = 1"], tokenizer, 1)
    with pytest.raises(ValueError, match="corpus too small"):
        pack(["x = 1"], tokenizer, 512)
    assert pack_ids([[1, 2, 3], [4, 5]], 2) == [[1, 2], [3, 4]]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_local_jsonl_parquet_text_and_directory(tmp_path):
    records = [{"text": f"def f{i}():\n    return {i}\n", "n": i} for i in range(200)]
    (tmp_path / "data").mkdir()
    jsonl = write_jsonl(tmp_path / "data" / "a.jsonl", records)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "data" / "b.parquet"))
    (tmp_path / "data" / "c.txt").write_text("plain text file\n")

    train, val = load_texts(str(jsonl), "train"), load_texts(str(jsonl), "validation")
    assert sorted(train + val) == sorted(r["text"] for r in records) and 0 < len(val) < 30
    assert load_texts(str(jsonl), "train") == train  # deterministic
    parquet = load_texts(str(tmp_path / "data" / "b.parquet"), "train") + load_texts(
        str(tmp_path / "data" / "b.parquet"), "validation"
    )
    assert sorted(parquet) == sorted(r["text"] for r in records)
    both = load_texts(str(tmp_path / "data"), "train") + load_texts(str(tmp_path / "data"), "validation")
    assert len(both) == 401 and "plain text file\n" in both
    assert len(load_texts(str(tmp_path / "data"), "train", limit=7)) == 7


def test_local_errors_name_the_problem(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}] * 50)
    with pytest.raises(ValueError, match="no field 'text'.*content"):
        load_texts(str(jsonl), "train")
    with pytest.raises(ValueError, match="no such file"):
        load_texts(str(tmp_path / "missing.jsonl"), "train")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_texts(str(tmp_path / "bad.jsonl"), "train")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        load_texts(str(tmp_path / "empty.jsonl"), "train")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_texts(str(tmp_path / "x.csv"), "train")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no .jsonl"):
        load_texts(str(tmp_path / "nothing"), "train")


def test_hub_dataset_unreachable_is_a_clear_error(monkeypatch):
    # Offline here: make the hub client fail at once instead of retrying for ~20 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="cannot load dataset 'someone/no-such-dataset'"):
        load_texts("someone/no-such-dataset", "train")


def _texts(pairs) -> list[str]:
    return [record["text"] for _, record in pairs]


def test_hub_splits_never_overlap_and_test_is_not_validation():
    train = [{"text": f"train {i}"} for i in range(400)]
    test = [{"text": f"test {i}"} for i in range(50)]
    no_validation = datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)})
    fit, held_out = _texts(split_records(no_validation, "train", 0.1)), _texts(split_records(no_validation, "validation", 0.1))
    assert not set(fit) & set(held_out) and sorted(fit + held_out) == sorted(r["text"] for r in train)
    assert 10 < len(held_out) < 80 and not any(t.startswith("test") for t in fit + held_out)

    own = datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "validation": datasets.Dataset.from_list(test)})
    assert _texts(split_records(own, "train", 0.1)) == [r["text"] for r in train]
    assert _texts(split_records(own, "validation", 0.1)) == [r["text"] for r in test]


def test_hub_dataset_reads_data_dir_as_a_folder_and_passes_hf_token(tmp_path, monkeypatch):
    """A dataset repository (here a local folder, read by the same datasets.load_dataset the
    hub path uses) with two folders: data_dir picks one; HF_TOKEN goes to load_dataset."""
    for folder, word in (("data/python", "def"), ("data/js", "function")):
        (tmp_path / folder).mkdir(parents=True)
        write_jsonl(tmp_path / folder / "part.jsonl", [{"text": f"{word} f{i}"} for i in range(60)])
    calls = []
    real = datasets.load_dataset

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    texts = _texts(_hub_records(str(tmp_path), "train", 0.05, data_dir="data/python"))
    texts += _texts(_hub_records(str(tmp_path), "validation", 0.05, data_dir="data/python"))
    assert sorted(texts) == sorted(f"def f{i}" for i in range(60))
    assert calls[0]["data_dir"] == "data/python" and calls[0]["token"] == "hf_secret"
    with pytest.raises(ValueError, match="data_dir='data/python' applies to Hugging Face datasets"):
        load_texts("stdlib", "train", data_dir="data/python")


def test_chat_messages_use_the_chat_template(tmp_path, tokenizer):
    chats = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(40)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    texts = load_texts(str(path), "train", chat=True, tokenizer=tokenizer) + load_texts(
        str(path), "validation", chat=True, tokenizer=tokenizer
    )
    assert sorted(texts) == sorted(f"<|user|>q{i}\n<|assistant|>a{i}\n" for i in range(40))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_texts(str(path), "train", chat=True)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": "hello"}] * 40)
    with pytest.raises(ValueError, match="list of \\{role, content\\} messages"):
        load_texts(str(bad), "train", chat=True, tokenizer=tokenizer)
    no_template = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>")
    with pytest.raises(ValueError, match="chat template"):
        load_texts(str(path), "train", chat=True, tokenizer=no_template)


def plain_greedy(model, prompt: list[int], n: int, banned: list[int], eos: set[int]) -> list[int]:
    """Greedy continuation by full forwards (no cache), SATs never chosen, up to EOS."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            logits[banned] = float("-inf")
            ids.append(int(logits.argmax()))
            if ids[-1] in eos:
                break
    return ids


def test_self_distill_appends_the_models_own_greedy_continuation():
    loaded = tiny_loaded(k=4)
    prompts = [[5, 6, 7], [9] * 11, [40, 41, 42, 43, 44, 45], [3]]
    out = self_distill(loaded, prompts, max_new_tokens=6, batch_size=3)
    eos = {loaded.model.generation_config.eos_token_id}  # 2 for a default LlamaConfig
    assert out == [plain_greedy(loaded.model, p, 6, loaded.sat.sat_ids, eos) for p in prompts]
    assert any(len(o) == len(p) + 6 for o, p in zip(out, prompts))
    with pytest.raises(ValueError, match="batch_size"):
        self_distill(loaded, prompts, 6, batch_size=0)


def test_self_distill_keeps_to_its_time_budget_and_reports_rate_and_eta(caplog):
    loaded = tiny_loaded(k=4)
    prompts = [[5, 6, 7], [9] * 11, [40, 41, 42, 43, 44, 45], [3]]
    with caplog.at_level(logging.INFO, logger="sdsat"):
        out = self_distill(loaded, prompts, max_new_tokens=6, batch_size=2, max_seconds=0.0)
    assert out == self_distill(loaded, prompts[:2], max_new_tokens=6, batch_size=2)  # the first batch only
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("self-distillation: 2/4 prompts")]
    assert lines and "prompts/s" in lines[0] and "eta " in lines[0] and "new tok/s" in lines[0]
    assert any("time budget" in r.getMessage() for r in caplog.records)


def test_sampled_distillation_adds_distinct_reproducible_rows_after_the_greedy_ones():
    """distill_sampled: each prompt's greedy row, then sampled ones; a sample's seed comes from
    its prompt and number, so the rows do not depend on how the work is split into parts."""
    from sdsat.training.config import load_config
    from sdsat.training.distill import distill_rows, sampling_for, work_items

    loaded = tiny_loaded(k=4)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42, 43, 44, 45, 46], [12] * 7]
    items = work_items(prompts, 2)
    assert [j for _, j in items] == [0, 0, 0, 1, 1, 1, 2, 2, 2] and [p for p, _ in items[3:6]] == prompts
    sampling = sampling_for(items, 1.0)
    assert sampling[:3] == [None] * 3 and len({s.seed for s in sampling[3:]}) == 6
    assert [s.seed for s in sampling_for(items[::-1], 1.0)[:6]] == [s.seed for s in sampling[3:]][::-1]  # not by position
    assert sampling_for(items, 1.0, seed=1)[3].seed != sampling[3].seed

    out = self_distill(loaded, [p for p, _ in items], max_new_tokens=12, batch_size=4, sampling=sampling)
    assert out[:3] == self_distill(loaded, prompts, max_new_tokens=12)  # the greedy rows are unchanged
    assert all(row[: len(p)] == p for row, (p, _) in zip(out, items))
    assert len({tuple(row) for row in out}) > len(prompts)  # sampling made other continuations
    with pytest.raises(ValueError, match="sampling has 2 entries for 9 prompts"):
        self_distill(loaded, [p for p, _ in items], 4, sampling=sampling[:2])

    # through distill_rows, split over two workers' parts: the same rows as in one batch
    cfg = load_config(overrides={"num_sat": 4, "distill_max_new_tokens": 12, "distill_sampled": 2, "num_workers": 2,
                                 "distill_prompt_len": 7}).model_dump()
    parts_seen = []

    def run_parts(parts):
        parts_seen.append(len(parts))
        return [distill_part_with(loaded, cfg, part) for part in parts]

    got = distill_rows(cfg, np.asarray([p[:7] + [0] * 9 for p in prompts]), run_parts)
    assert parts_seen == [2] and sorted(map(tuple, got)) == sorted(map(tuple, out))


def test_distill_rows_counts_work_items_greedy_first():
    """distill_rows cuts the work list (every greedy row, then the sampled rounds): with no
    sampling that is the first N prompts, as the stage configs have always meant."""
    from sdsat.training.config import load_config
    from sdsat.training.distill import distill_rows

    rows = np.arange(3 * 16).reshape(3, 16)
    for sampled, cut, expected in ((1, 4, [(0, 0), (16, 0), (32, 0), (0, 1)]), (0, 2, [(0, 0), (16, 0)]), (2, None, 9)):
        cfg = load_config(overrides={"num_sat": 4, "distill_max_new_tokens": 4, "distill_sampled": sampled,
                                     "distill_rows": cut, "distill_prompt_len": 6}).model_dump()
        seen = []
        distill_rows(cfg, rows, lambda parts: seen.extend(parts[0]) or [[list(p) + [1] * 4 for p, _ in parts[0]]])
        got = [(p[0], j) for p, j in seen]
        assert (got if isinstance(expected, list) else len(got)) == expected


def distill_part_with(loaded, cfg, items):
    """distill_part's work on an already loaded model (distill_part loads cfg["model"])."""
    from sdsat.training.distill import sampling_for

    return self_distill(loaded, [list(p) for p, _ in items], cfg["distill_max_new_tokens"],
                        sampling=sampling_for(items, cfg["distill_temperature"], cfg["seed"]))


@pytest.mark.slow
def test_default_model_stdlib_pack_and_self_distill(default_fp32):
    tok = default_fp32.tokenizer
    ds = pack(load_texts("stdlib", "validation", limit=2), tok, 128)
    assert len(ds) > 0 and all(len(r) == 128 for r in ds["input_ids"])
    prompts = [ds["input_ids"][0][:32], ds["input_ids"][1][:20]]
    out = self_distill(default_fp32, prompts, max_new_tokens=8)
    assert [o[: len(p)] for o, p in zip(out, prompts)] == prompts
    assert all(len(p) < len(o) <= len(p) + 8 for o, p in zip(out, prompts))
    banned, eos = default_fp32.sat.sat_ids, {tok.eos_token_id}
    assert out[0] == plain_greedy(default_fp32.model, prompts[0], 8, banned, eos)
