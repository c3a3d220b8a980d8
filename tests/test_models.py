"""Loading models, adding SATs, storing their configuration, and the errors users meet."""

from __future__ import annotations

import json
import time

import pytest
import torch

from sdsat.model.load import load_model, parse_dtype, resolve_path, save_model
from sdsat.model.sat import CONFIG_FILE, SATConfig, add_sat_tokens
from tests.conftest import tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base():
    return load_model("default-base", dtype="float32")


def test_default_model_loads_offline_and_fast(base):
    start = time.perf_counter()
    again = load_model("default-base", dtype="bfloat16")
    elapsed = time.perf_counter() - start
    assert type(base.model).__name__ == "LlamaForCausalLM"
    assert base.model.config.vocab_size == 49152
    assert sum(p.numel() for p in base.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert base.sat is None
    assert again.dtype == torch.bfloat16
    assert base.tokenizer.model_max_length == 8192
    print(f"default model reload in bf16: {elapsed:.1f}s")


@pytest.mark.parametrize("repeated", [False, True])
def test_add_sats_keeps_old_logits_and_round_trips(base, tmp_path, repeated):
    loaded = load_model("default-base", dtype="float32")
    ids = torch.tensor([base.tokenizer.encode("def add(a, b):\n    return")])
    before = base.model(ids).logits
    sat = add_sat_tokens(loaded.model, loaded.tokenizer, 5, repeated=repeated, base_model="default")
    loaded.sat = sat
    assert len(sat.sat_ids) == 5
    assert len(set(sat.sat_ids)) == (1 if repeated else 5)
    assert min(sat.sat_ids) >= 49152
    after = loaded.model(ids).logits
    assert torch.equal(after[..., :49152], before)
    rows = loaded.model.get_input_embeddings().weight[sat.unique_ids]
    if not repeated:
        assert not torch.equal(rows[0], rows[1])  # noise makes the k rows differ

    sat.num_sat_trained = 5
    sat.recipe = {"lr": 1e-4}
    save_model(loaded, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["sat_ids"] == sat.sat_ids
    reloaded = load_model(str(tmp_path), dtype="float32")
    assert reloaded.sat == sat
    assert reloaded.tokenizer.convert_tokens_to_ids(sat.sat_tokens) == sat.sat_ids
    assert torch.equal(reloaded.model.get_input_embeddings().weight[sat.unique_ids], rows)


def test_sat_init_from_a_token_copies_its_row(base):
    loaded = load_model("default-base", dtype="float32")
    sat = add_sat_tokens(loaded.model, loaded.tokenizer, 3, init="def", noise_std=0.0)
    weight = loaded.model.get_input_embeddings().weight
    src = loaded.tokenizer.get_vocab()["def"]
    for sat_id in sat.sat_ids:
        assert torch.equal(weight[sat_id], weight[src])
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        add_sat_tokens(loaded.model, loaded.tokenizer, 2, repeated=True, init="no-such-token-xyz")


def test_adding_sats_twice_is_refused(base):
    loaded = load_model("default-base", dtype="float32", add_sat=3)
    with pytest.raises(ValueError, match="already has SAT tokens"):
        add_sat_tokens(loaded.model, loaded.tokenizer, 3)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    from transformers import DistilBertConfig, DistilBertModel

    encoder = DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37, vocab_size=99))
    encoder.save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match="not a causal language model"):
        load_model(str(tmp_path / "encoder"))
    with pytest.raises(ValueError, match="float16 is for GPUs"):
        parse_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="out of range"):
        SATConfig(sat_ids=[1, 2], sat_tokens=["a", "b"]).ids_for(3)


def test_any_checkpoint_path_loads_the_same_way(tmp_path, base):
    model = tiny_model(vocab=49152)
    model.save_pretrained(tmp_path)
    base.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), add_sat=2)
    assert loaded.sat.num_sat == 2
    assert resolve_path(str(tmp_path)) == str(tmp_path)
