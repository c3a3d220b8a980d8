"""The SAT-position adapter and the frozen-base (two-pass) loss, on tiny random models."""

from __future__ import annotations

import random

import pytest
import torch

from sdsat.model.adapter import WEIGHTS_FILE, AdapterConfig, attach_adapter, get_adapter
from sdsat.training.frozen_loss import FrozenLossConfig, collate_two_pass, frozen_loss, two_pass_masks
from sdsat.decode.generate import generate, make_sequences
from sdsat.model.load import LoadedModel, load_model, save_artifact, save_model
from sdsat.training.rows import RowConfig, build_row, collate
from sdsat.model.sat import CONFIG_FILE, SATConfig
from tests.conftest import tiny_loaded, tiny_model, train_frozen
from tests.test_finetune_config import tiny_tokenizer

K = 4


def _randomize(adapter, seed: int = 0, std: float = 0.2) -> None:
    """Give the deltas (which start at zero) and the SAT rows values that change SAT outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in adapter.deltas.values():
            delta.b.copy_(torch.randn(delta.b.shape, generator=gen) * std)
        adapter.sat_embed.add_(torch.randn(adapter.sat_embed.shape, generator=gen))


@pytest.fixture
def adapted():
    loaded = tiny_loaded(k=K)
    reference = tiny_model()  # the same seeded weights, never adapted
    adapter = attach_adapter(loaded.model, loaded.sat.sat_ids, AdapterConfig(rank=4))
    _randomize(adapter)
    return loaded, reference, adapter


def test_standard_tokens_are_the_base_model_bit_for_bit(adapted):
    loaded, reference, adapter = adapted
    ids = torch.randint(1, 200, (2, 12))
    assert torch.equal(loaded.model(ids).logits, reference(ids).logits)
    # With SATs appended (causal mask: the standard tokens come first), the standard rows
    # are unchanged and the SAT rows differ from the base model's.
    sats = torch.tensor([loaded.sat.sat_ids] * 2)
    with_sats = torch.cat([ids, sats], dim=1)
    out, base = loaded.model(with_sats).logits, reference(with_sats).logits
    assert torch.equal(out[:, :12], base[:, :12])
    assert (out[:, 12:] - base[:, 12:]).abs().amax() > 1e-2
    adapter.detach()
    assert torch.equal(loaded.model(with_sats).logits, base)


@pytest.mark.parametrize("layout", ["one run", "scattered"])
def test_decoding_deltas_equal_the_training_products(adapted, monkeypatch, layout):
    """Decoding computes each delta on the SAT rows alone (a slice where they are one run of
    rows, else gathered), fused per shared-input group with the scale folded into B; training
    computes one masked product pair per layer over every row. Both give the same logits, and
    after the pass every adapted layer has its own forward back (here, an instance forward of
    its own, as packed kernels give it)."""
    loaded, _, adapter = adapted
    sat = loaded.sat.sat_ids
    if layout == "one run":
        ids = torch.tensor([[5, 6, 7] + sat])
    else:
        ids = torch.tensor([[5, 6, sat[0], sat[1], 7, 8], [sat[2], 9, 10, sat[0], sat[3], 11]])
    runs = []
    begin = adapter._begin_pass
    monkeypatch.setattr(adapter, "_begin_pass", lambda: (runs.append(adapter._run), begin())[1])
    own = {key: linear.forward for key, linear in adapter._linears.items()}
    for linear in adapter._linears.values():
        linear.forward = linear.forward  # an instance attribute, like a packed layer's
    with torch.no_grad():
        decoding = loaded.model(ids).logits
    with torch.enable_grad():
        training = loaded.model(ids).logits.detach()
    assert (runs[0] is not None) == (layout == "one run")
    torch.testing.assert_close(decoding, training)
    for key, linear in adapter._linears.items():
        assert linear.__dict__["forward"] == own[key]
        del linear.forward
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, decoding)  # the class forward: the same
    assert all("forward" not in linear.__dict__ for linear in adapter._linears.values())


def test_fresh_adapter_changes_only_sat_rows_through_its_embedding():
    loaded = tiny_loaded(k=K)
    ids = torch.tensor([[5, 6, 7] + loaded.sat.sat_ids])
    before = loaded.model(ids).logits
    adapter = attach_adapter(loaded.model, loaded.sat.sat_ids, AdapterConfig(rank=2))
    assert torch.equal(loaded.model(ids).logits, before)  # B = 0 and the rows copied: no change
    with torch.no_grad():
        adapter.sat_embed[0] += 1.0
    after = loaded.model(ids).logits
    assert torch.equal(after[:, :3], before[:, :3]) and not torch.equal(after[:, 3:], before[:, 3:])


@pytest.mark.parametrize("k", [1, 3, K])
def test_sdsat_with_adapter_equals_plain_greedy(adapted, k):
    loaded, reference, _ = adapted
    prompts = [[3, 9, 27, 81], [1, 2, 3, 5, 8, 13, 21], [100]]
    plain = generate(LoadedModel(reference, loaded.tokenizer, loaded.sat, "ref", ""), make_sequences(loaded, prompts, 24))
    sdsat = generate(loaded, make_sequences(loaded, prompts, 24), num_sat=k, two_step=True)  # the SAT drafts themselves
    assert [s.output_ids for s in sdsat] == [s.output_ids for s in plain]
    assert sum(s.stats.iterations for s in sdsat) < sum(len(s.output_ids) for s in sdsat)  # several verify rounds


def _rows(sat_ids, seed=0, lengths=(30, 22)):
    rng = random.Random(seed)
    cfg = RowConfig(num_sat=K, poisson_lambda=8, max_blocks=12, variable_length=True)
    return [build_row([rng.randrange(1, 200) for _ in range(n)], sat_ids, cfg, rng) for n in lengths]


def test_two_pass_sat_logits_equal_one_pass(adapted):
    """The SAT blocks' hidden states over a cache of the standard tokens equal those of one
    pass over the augmented row (padded batch of unequal rows, fp32)."""
    loaded, _, _ = adapted
    rows = _rows(loaded.sat.sat_ids)
    one = collate(rows, 0, torch.float32)
    two = collate_two_pass(rows, 0)
    with torch.no_grad():
        h1 = loaded.model.get_decoder()(
            input_ids=one["input_ids"], position_ids=one["position_ids"], attention_mask=one["attention_mask"]
        ).last_hidden_state
        labelled_sat = (one["labels"] != -100) & (one["sat_offset"] > 0)
        expected = h1[labelled_sat]
        # the same forward the loss runs, with the SAT pass's hidden states captured
        captured = {}
        handle = loaded.model.get_decoder().register_forward_hook(
            lambda m, a, out: captured.__setitem__("h", out.last_hidden_state)
        )
        frozen_loss(loaded.model, two, FrozenLossConfig(tuple(loaded.sat.sat_ids), K))
        handle.remove()
    got = captured["h"][two["labels"] != -100]
    assert got.shape == expected.shape and got.shape[0] > 10
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # teacher positions: standard position t+i holds the data label of SAT i of anchor t
    std_next = torch.cat([two["std_ids"][:, 1:], torch.zeros_like(two["std_ids"][:, :1])], dim=1).reshape(-1)
    assert torch.equal(std_next[two["teacher_index"]], two["labels"][two["labels"] != -100])


def test_frozen_loss_trains_only_the_adapter_and_learns():
    loaded = tiny_loaded(k=K)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    adapter = attach_adapter(loaded.model, loaded.sat.sat_ids, AdapterConfig(rank=16))
    cfg = FrozenLossConfig(tuple(loaded.sat.sat_ids), K, w_teacher=1.0, w_kl=0.1, w_sat=0.1)
    batch = collate_two_pass(_rows(loaded.sat.sat_ids, seed=1), 0)
    first, metrics = train_frozen(loaded.model, batch, cfg, adapter.parameters(), "sdsat_adapter")
    # A random tiny model's logits span little (its head is small), so the CE stays high;
    # but the SAT predictions come to agree with the teacher on this batch.
    assert metrics["loss"] < first["loss"] - 0.5
    assert sum(first["sat_acc"]) / K < 0.3 and sum(metrics["sat_acc"]) / K > 0.8
    assert len(metrics["sat_acc"]) == K and metrics["n_sat"] == sum(metrics["sat_count"]) > 0
    assert metrics["ce_std"] == 0.0 and metrics["kl_sat"] >= 0


def test_checkpoint_and_artifact_round_trip(tmp_path):
    """save_model keeps the adapter out of model.safetensors and load_model re-attaches it;
    an artifact (config + adapter only) loads onto the base model it names."""
    base_dir = tmp_path / "base"
    save_model(LoadedModel(tiny_model(vocab=257), tiny_tokenizer(), None, "tiny", ""), base_dir)
    loaded = load_model(str(base_dir), add_sat=K)
    adapter = attach_adapter(loaded.model, loaded.sat.sat_ids, AdapterConfig(rank=3, targets=("q_proj", "down_proj")))
    _randomize(adapter, seed=2)
    loaded.sat.base_model = str(base_dir)
    ids = torch.tensor([[40, 41, 42] + loaded.sat.sat_ids])
    expected = loaded.model(ids).logits

    save_model(loaded, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / WEIGHTS_FILE).exists()
    from safetensors.torch import load_file

    assert not any("sdsat_adapter" in key for key in load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    assert get_adapter(loaded.model) is adapter  # still attached after saving
    again = load_model(str(tmp_path / "ckpt"))
    assert again.sat.adapter == {"rank": 3, "alpha": 32.0, "targets": ["q_proj", "down_proj"]}
    torch.testing.assert_close(again.model(ids).logits, expected)

    save_artifact(loaded, tmp_path / "artifact", dtype=torch.float32)
    assert sorted(p.name for p in (tmp_path / "artifact").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    from_artifact = load_model(str(tmp_path / "artifact"))
    assert from_artifact.sat.sat_ids == loaded.sat.sat_ids
    torch.testing.assert_close(from_artifact.model(ids).logits[..., :257], expected[..., :257])

    bad = SATConfig.load(tmp_path / "artifact")
    bad.sat_ids = [s + 1 for s in bad.sat_ids]
    bad.save(tmp_path / "artifact")
    with pytest.raises(ValueError, match="do not fit the base model"):
        load_model(str(tmp_path / "artifact"))


def test_a_two_pass_batch_carries_integers_and_its_masks_are_built_where_it_lives(adapted):
    """Nothing of size (W + S)^2 crosses to the device: the batch is [B, T] integers, and the
    masks come from them on the batch's device, in the dtype asked."""
    loaded, _, _ = adapted
    batch = collate_two_pass(_rows(loaded.sat.sat_ids), 0)
    assert all(t.dtype == torch.long and t.dim() <= 2 for t in batch.values())
    std_mask, sat_mask = two_pass_masks(batch, torch.bfloat16)
    b, w = batch["std_ids"].shape
    s = batch["sat_ids"].shape[1]
    assert std_mask.shape == (b, 1, w, w) and sat_mask.shape == (b, 1, s, w + s)
    assert std_mask.dtype == sat_mask.dtype == torch.bfloat16 and sat_mask.device == batch["sat_ids"].device
    # a real standard query sees exactly the standard tokens up to itself
    real = batch["std_block"][0] != -2
    n = int(real.sum())
    assert torch.equal(std_mask[0, 0, :n, :n] == 0, torch.ones(n, n, dtype=torch.bool).tril())
