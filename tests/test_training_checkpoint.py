"""Checkpoints of the training loop: safetensors and JSON only, complete or refused (no Ray)."""

from __future__ import annotations

import pickle

import pytest
import torch

from sdsat.training.checkpoint import find_checkpoint, is_complete, load_checkpoint, read_state, save_checkpoint
from sdsat.training.setup import make_scheduler
from tests.conftest import tiny_model

SCHEDULE = {"warmup_steps": 1, "max_steps": 10, "min_lr_ratio": 0.1}


def _trained(steps: int, seed: int = 0):
    model = tiny_model(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    scheduler = make_scheduler(optimizer, SCHEDULE)
    x = torch.arange(2, 34).view(2, 16)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def _save(directory, steps=2):
    model, optimizer, scheduler = _trained(steps)
    save_checkpoint(directory, model, optimizer, scheduler, {"step": steps, "samples": 8, "train_s": 1.0}, rank=0, world=1)
    return model, optimizer, scheduler


def test_save_then_load_restores_model_optimizer_schedule_and_rng_without_unpickling(tmp_path, monkeypatch):
    model, optimizer, scheduler = _save(tmp_path / "ck")
    expected_rng = torch.get_rng_state()
    assert is_complete(tmp_path / "ck") and find_checkpoint(tmp_path / "ck") == tmp_path / "ck"
    assert not [p for p in (tmp_path / "ck").rglob("*") if p.suffix in (".pt", ".pkl", ".metadata", ".distcp")]

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh, fresh_opt, fresh_sched = _trained(0, seed=1)
    torch.manual_seed(123)
    state = load_checkpoint(tmp_path / "ck", fresh, fresh_opt, fresh_sched, rank=0)
    assert state["step"] == 2 and state["world"] == 1
    assert torch.equal(torch.get_rng_state(), expected_rng)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(model.parameters(), fresh.parameters()):
        for slot in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][slot], fresh_opt.state[q][slot]), slot
    assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr() and fresh_sched.last_epoch == 2


def test_a_missing_or_short_shard_makes_the_checkpoint_incomplete(tmp_path):
    _save(tmp_path / "checkpoint_000002")
    shard = next((tmp_path / "checkpoint_000002" / "weights").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    assert not is_complete(tmp_path / "checkpoint_000002")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        find_checkpoint(tmp_path)
    shard.unlink()
    assert not is_complete(tmp_path / "checkpoint_000002")


@pytest.mark.parametrize("unsafe", ["rng_rank0.pt", "dcp/.metadata", "dcp/dcp_index.pkl"])
def test_pickle_based_files_are_refused(tmp_path, unsafe):
    _save(tmp_path / "ck")
    (tmp_path / "ck" / unsafe).parent.mkdir(exist_ok=True)
    (tmp_path / "ck" / unsafe).write_bytes(pickle.dumps({"step": 1}))
    with pytest.raises(ValueError, match="pickle-based files"):
        find_checkpoint(tmp_path / "ck")
    model, optimizer, scheduler = _trained(0)
    with pytest.raises(ValueError, match="never loaded"):
        load_checkpoint(tmp_path / "ck", model, optimizer, scheduler, rank=0)
    assert read_state(tmp_path / "ck")["step"] == 2  # JSON is still read


def _tied(seed: int):
    model = tiny_model(seed=seed)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied input and output embeddings (the default model's)
    return model


def test_tied_embeddings_are_saved_once_and_restored(tmp_path):
    model = _tied(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.arange(2, 34).view(2, 16)
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ck", model, optimizer, make_scheduler(optimizer, SCHEDULE), {"step": 1}, rank=0, world=1)
    fresh = _tied(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_checkpoint(tmp_path / "ck", fresh, fresh_opt, make_scheduler(fresh_opt, SCHEDULE), rank=0)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


def test_an_export_writes_tied_embeddings_once(tmp_path):
    """The export's weights of a tied model (the default model's): the state dict gives the two
    names as distinct tensor objects over one storage, which safetensors refuses together."""
    from safetensors.torch import load_file

    from sdsat.training.export import _named_tensors, _write_weights

    model = _tied(0)
    named = _named_tensors(model, None, {"train": "full"}, rank=0)
    _write_weights(named, tmp_path, torch.float32, rank=0)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert len(saved) == len(named) == len(list(model.parameters()))  # parameters() lists a tied one once
    assert torch.equal(saved["embed_tokens.weight"], model.model.embed_tokens.weight)
