"""The draft-coherence head: chained guesses, exact decoding, training only the head, storage."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sdsat.decode.decoding import draft, prefill
from sdsat.decode.fused import RowNodes, fused_pass
from sdsat.decode.generate import generate, make_sequences
from sdsat.decode.kv_cache import SlotCache
from sdsat.decode.scheduler import Scheduler
from sdsat.model.adapter import AdapterConfig, attach_adapter
from sdsat.model import draft_head
from sdsat.model.draft_head import WEIGHTS_FILE, HeadConfig, attach_head, get_head, remove_head, top_candidates
from sdsat.model.load import LoadedModel, load_model, save_artifact, save_model
from sdsat.model.sat import SATConfig
from sdsat.training.distill import read_prompts
from sdsat.training.frozen_loss import FrozenLossConfig, collate_two_pass, frozen_loss
from sdsat.training.rows import RowConfig, build_row
from sdsat.training.setup import select_trainable
from tests.conftest import hf_greedy, tiny_loaded, tiny_model, train_frozen
from tests.test_finetune_config import tiny_tokenizer

K = 4
PROMPTS = [[3, 9, 27, 81], [1, 2, 3, 5, 8, 13, 21], [100, 7]]
NEW = 24


def _randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _headed(arch: str = "llama", seed: int = 0) -> tuple[LoadedModel, object]:
    loaded = tiny_loaded(arch, k=K)
    head = attach_head(loaded.model, HeadConfig(width=32))
    _randomize(head, seed)
    return loaded, head


def _draft(loaded: LoadedModel, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    banned = torch.tensor(loaded.sat.unique_ids)
    with torch.inference_mode():
        cache = SlotCache.for_model(loaded.model, len(PROMPTS))
        last = prefill(loaded.model, cache, PROMPTS, 0)
        return draft(loaded.model, cache, last, torch.tensor(loaded.sat.ids_for(k)), banned)


def test_a_fresh_head_guesses_exactly_what_the_sats_guess():
    loaded = tiny_loaded(k=K)
    y0, plain = _draft(loaded)
    attach_head(loaded.model, HeadConfig(width=16))  # its second layer starts at zero
    y0_head, chained = _draft(loaded)
    assert torch.equal(y0, y0_head) and torch.equal(plain, chained)


def test_guesses_are_chained_on_the_token_before_each(monkeypatch):
    """d_1 is read from SAT 1 given y0 (the pass's exact next token), d_i from SAT i given d_(i-1);
    each also given the hidden state at ``last``, the block's anchor, and chosen among SAT i's
    own top HEAD_CANDIDATES tokens (here 16 of the tiny model's 256, so the restriction bites)."""
    monkeypatch.setattr(draft_head, "HEAD_CANDIDATES", 16)
    loaded, head = _headed()
    y0, chained = _draft(loaded)
    banned = torch.tensor(loaded.sat.unique_ids)
    with torch.inference_mode():
        cache = SlotCache.for_model(loaded.model, len(PROMPTS))
        last = prefill(loaded.model, cache, PROMPTS, 0)
        ids = torch.cat([last[:, None], torch.tensor([loaded.sat.ids_for(K)] * len(PROMPTS))], dim=1)
        sat_logits = loaded.model(input_ids=ids, attention_mask=cache.prepare(K + 1, cache.dtype, None),
                                  position_ids=cache.position_ids(K + 1, None), cache=cache, use_cache=True).logits
        hidden, prev, expected = head.hidden, y0, []
        for i in range(K):
            logits = head.logits(hidden[:, 1 + i], prev, hidden[:, 0]).index_fill(-1, banned, float("-inf"))
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            allowed.scatter_(1, sat_logits[:, 1 + i].topk(16, dim=-1).indices, True)
            prev = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
            expected.append(prev)
    assert torch.equal(chained, torch.stack(expected, dim=1))
    assert not torch.equal(chained, _draft(tiny_loaded(k=K))[1])  # the head changed the drafts


def test_candidates_change_only_which_tokens_a_guess_may_be():
    """Among every token the restricted guess is the full one; among a few it is the best of those."""
    loaded, head = _headed()
    torch.manual_seed(0)
    hidden, anchor = torch.randn(3, 4, 64), torch.randn(3, 64)
    first, banned = torch.tensor([5, 6, 7]), torch.tensor(loaded.sat.unique_ids)
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    full = head.chain(hidden, first, anchor, [4, 2, 3], banned)
    everything = torch.arange(vocab).expand(3, 4, vocab)
    assert head.chain(hidden, first, anchor, [4, 2, 3], banned, everything) == full
    few = torch.randint(0, vocab, (3, 4, 8))
    few[:, :, 0] = banned[0]  # a banned candidate is never chosen
    guesses = head.chain(hidden, first, anchor, [4, 2, 3], banned, few)
    for r, row in enumerate(guesses):
        for step, token in enumerate(row):
            assert token in few[r, step].tolist() and token != banned[0]
    assert top_candidates(torch.zeros(2, vocab), vocab) is None and top_candidates(torch.zeros(2, vocab), 0) is None


def test_a_head_leaves_every_model_output_bit_identical():
    loaded, _ = _headed()
    reference = tiny_model()
    ids = torch.tensor([PROMPTS[1] + loaded.sat.sat_ids])
    assert torch.equal(loaded.model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["two_step", "scheduled"])
def test_decoding_with_a_head_equals_plain_greedy(arch, mode):
    loaded, _ = _headed(arch)
    refs = [hf_greedy(loaded, p, NEW) for p in PROMPTS]
    seqs = make_sequences(loaded, PROMPTS, NEW, eos=False)
    if mode == "two_step":
        generate(loaded, seqs, K, two_step=True)
    else:
        scheduler = Scheduler(lambda rows, q: 1.0, explore_fraction=0.5, explore_every=3)
        scheduler.total_s = 1e9
        generate(loaded, seqs, K, lookup=0, scheduler=scheduler)
    assert [s.output_ids for s in seqs] == refs
    assert all(s.stats.new_tokens == NEW for s in seqs)


def block_pass(loaded: LoadedModel, next_alternatives: list | None = None):
    """A fused pass over PROMPTS with no drafts and a draft block of K SATs: its results."""
    banned = torch.tensor(loaded.sat.unique_ids)
    sat = list(loaded.sat.ids_for(K))
    with torch.inference_mode():
        cache = SlotCache.for_model(loaded.model, len(PROMPTS))
        last = prefill(loaded.model, cache, PROMPTS, 0)
        rows = [RowNodes([], [], K) for _ in PROMPTS]
        return fused_pass(loaded.model, cache, last, rows, 1 + K, sat, banned, sat[0], next_alternatives=next_alternatives)


def test_fused_next_drafts_are_the_two_step_chain():
    """With nothing accepted, the fused pass's next drafts are the draft pass's chained drafts."""
    loaded, _ = _headed()
    _, drafts = _draft(loaded)
    _, _, nxt, accepted = block_pass(loaded)
    assert accepted == [0] * len(PROMPTS)
    assert nxt == drafts.tolist()


def _rows(sat_ids, seed=0):
    rng = random.Random(seed)
    cfg = RowConfig(num_sat=K, poisson_lambda=8, max_blocks=12)
    return [build_row([rng.randrange(1, 200) for _ in range(n)], sat_ids, cfg, rng) for n in (30, 22)]


def test_removing_the_head_restores_the_sats_own_guesses():
    loaded, head = _headed()
    alone = _draft(tiny_loaded(k=K))[1]
    assert not torch.equal(_draft(loaded)[1], alone)
    assert remove_head(loaded.model) is head and get_head(loaded.model) is None
    assert torch.equal(_draft(loaded)[1], alone) and head.hidden is None  # it no longer records
    assert remove_head(loaded.model) is None
    assert all("sdsat_head" not in n for n, _ in loaded.model.named_parameters())


def test_head_only_training_reaches_only_the_head_and_learns():
    loaded = tiny_loaded(k=K)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    adapter = attach_adapter(loaded.model, loaded.sat.sat_ids, AdapterConfig(rank=4))
    adapter.requires_grad_(False)
    head = attach_head(loaded.model, HeadConfig(width=64))
    cfg = FrozenLossConfig(tuple(loaded.sat.sat_ids), K, w_teacher=0.0, w_head=1.0, sat_grad=False)
    batch = collate_two_pass(_rows(loaded.sat.sat_ids), 0)
    first, metrics = train_frozen(loaded.model, batch, cfg, head.parameters(), "sdsat_head")
    assert metrics["loss"] < first["loss"] - 0.5
    assert sum(metrics["sat_acc"]) / K > sum(first["sat_acc"]) / K + 0.3


def test_keep_head_continues_the_loaded_head_and_its_adapter():
    cfg = {"train": "sat_adapter", "precision": "fp32", "model": "tiny", "draft_head": 32, "keep_head": True,
           "seed": 0, "lr": 1e-3, "sat_lr": None, "weight_decay": 0.0}
    loaded, head = _headed()
    adapter = attach_adapter(loaded.model, loaded.sat.sat_ids, AdapterConfig(rank=4))
    weights = {n: p.detach().clone() for n, p in head.named_parameters()}
    select_trainable(loaded.model, loaded.sat.sat_ids, cfg)
    assert get_head(loaded.model) is head  # the same head, weights untouched, and it trains
    assert all(torch.equal(p, weights[n]) and p.requires_grad for n, p in head.named_parameters())
    assert all(p.requires_grad for p in adapter.parameters())
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trainable and all("sdsat_head" in n or "sdsat_adapter" in n for n in trainable)

    select_trainable(loaded.model, loaded.sat.sat_ids, {**cfg, "keep_head": False})
    fresh = get_head(loaded.model)
    assert fresh is not head and not fresh.fc2.weight.any()  # without keep_head: a fresh head
    with pytest.raises(ValueError, match="no draft head of width 16 to continue \\(width 32\\)"):
        select_trainable(loaded.model, loaded.sat.sat_ids, {**cfg, "draft_head": 16})
    remove_head(loaded.model)
    with pytest.raises(ValueError, match="no draft head of width 32 to continue \\(none\\)"):
        select_trainable(loaded.model, loaded.sat.sat_ids, cfg)


def test_keep_head_needs_a_head_width():
    from sdsat.training.config import load_config

    with pytest.raises(ValueError, match="keep_head continues the loaded model's draft head"):
        load_config(None, {"train": "sat_adapter", "keep_head": True})


def test_head_loss_needs_a_head():
    loaded = tiny_loaded(k=K)
    batch = collate_two_pass(_rows(loaded.sat.sat_ids), 0)
    with pytest.raises(ValueError, match="needs a model with a draft head"):
        frozen_loss(loaded.model, batch, FrozenLossConfig(tuple(loaded.sat.sat_ids), K, w_head=1.0))


def test_head_round_trips_through_checkpoints_and_artifacts(tmp_path):
    base_dir = tmp_path / "base"
    save_model(LoadedModel(tiny_model(vocab=257), tiny_tokenizer(), None, "tiny", ""), base_dir)
    loaded = load_model(str(base_dir), add_sat=K)
    attach_adapter(loaded.model, loaded.sat.sat_ids, AdapterConfig(rank=3))
    _randomize(attach_head(loaded.model, HeadConfig(width=8)), seed=3)
    loaded.sat.base_model = str(base_dir)
    h, prev, anchor = torch.randn(5, 64), torch.tensor([1, 2, 3, 4, 5]), torch.randn(5, 64)
    expected = get_head(loaded.model).logits(h, prev, anchor)

    save_model(loaded, tmp_path / "ckpt")
    from safetensors.torch import load_file

    assert not any("sdsat_head" in key for key in load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    again = load_model(str(tmp_path / "ckpt"))
    assert again.sat.head == {"width": 8}
    torch.testing.assert_close(get_head(again.model).logits(h, prev, anchor), expected)

    save_artifact(loaded, tmp_path / "artifact", dtype=torch.float32)
    assert (tmp_path / "artifact" / WEIGHTS_FILE).exists()
    torch.testing.assert_close(get_head(load_model(str(tmp_path / "artifact")).model).logits(h, prev, anchor), expected)

    config = SATConfig.load(tmp_path / "artifact")
    config.head = {"width": 9}
    config.save(tmp_path / "artifact")
    with pytest.raises(ValueError, match="does not fit this model's draft head"):
        load_model(str(tmp_path / "artifact"))
    (tmp_path / "artifact" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_model(str(tmp_path / "artifact"))


def test_several_prompt_files_are_interleaved(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([[1], [2], [3]]))
    (tmp_path / "b.json").write_text(json.dumps([[10]]))
    assert read_prompts(f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}") == [[1], [10], [2], [3]]
    with pytest.raises(ValueError, match="no such file"):
        read_prompts(f"{tmp_path / 'a.json'},{tmp_path / 'missing.json'}")


def test_chat_prompts_hold_none_of_the_benchmark_prompts():
    from jobs.chat_prompts import instructions

    bench = [json.loads(line)["prompt"] for line in open("jobs/data/mixed_prompts.jsonl")]
    chats = instructions(512)
    assert len(set(chats)) == 512
    assert not any(text in prompt for text in chats for prompt in bench)


def test_genre_prompts_hold_none_of_the_benchmark_prompts():
    from jobs.genre_prompts import texts

    bench = [json.loads(line)["prompt"] for line in open("jobs/data/mixed_prompts.jsonl")]
    found = [text for text, _ in texts()]
    assert len(set(found)) == len(found) >= 384
    openings = {tuple(prompt.splitlines()[:2]) for prompt in bench}  # a shebang alone may repeat
    assert not any(text in prompt or prompt in text for text in found for prompt in bench)
    assert not any(tuple(text.splitlines()[:2]) in openings for text in found)


def test_head_inputs_in_training_are_the_anchor_and_the_token_before_the_target():
    """For SAT i of anchor t the anchor feature sits at position t of the same row (the previous
    token, x_{t+i}, sits at the teacher's index: checked in tests/test_adapter.py)."""
    loaded = tiny_loaded(k=K)
    batch = collate_two_pass(_rows(loaded.sat.sat_ids), 0)
    labelled = batch["labels"] != -100
    offset, sat_pos = batch["sat_offset"][labelled], batch["sat_pos"][labelled]
    anchor_index = batch["teacher_index"] - offset
    assert torch.equal(batch["std_pos"].reshape(-1)[anchor_index], sat_pos - offset)  # position t
    width = batch["std_ids"].shape[1]
    assert torch.equal(anchor_index // width, batch["teacher_index"] // width)  # the same row
