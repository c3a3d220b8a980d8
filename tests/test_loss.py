"""The SDSAT loss: equal to a full-logits reference, SAT ids banned, per-offset accuracy, gradients."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from sdsat.training.loss import LossConfig, sdsat_loss
from sdsat.training.rows import IGNORE, RowConfig, build_row, collate
from tests.conftest import tiny_model

SATS = [252, 253, 254, 255]


def make_batch(lengths=(24, 13, 19), k=4, sat_ids=SATS, seed=0, variable=False, dtype=torch.float32):
    rng = random.Random(seed)
    cfg = RowConfig(num_sat=k, poisson_lambda=6.0, variable_length=variable)
    seqs = [[rng.randrange(1, 240) for _ in range(n)] for n in lengths]
    rows = [build_row(x, sat_ids, cfg, rng) for x in seqs]
    return seqs, collate(rows, 0, dtype)


def full_logits(model, batch, banned):
    """[B, T, V] fp32 logits at every position, banned ids at finfo.min."""
    logits = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"]
    ).logits.float()  # [B, T, V]
    logits[..., banned] = torch.finfo(torch.float32).min
    return logits


def reference(model, batch, banned, w_std=1.0, w_sat=1.0):
    """The loss and accuracies from full logits over every position (the slow way)."""
    logits = full_logits(model, batch, banned)
    labels, offset = batch["labels"], batch["sat_offset"]
    ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # [B, T]
    std = (labels != IGNORE) & (offset == 0)
    sat = (labels != IGNORE) & (offset > 0)
    ce_std, ce_sat = ce[std].mean(), ce[sat].mean()
    hit = logits.argmax(-1) == labels
    acc = [hit[sat & (offset == i)].float().mean().item() for i in range(1, int(offset.max()) + 1)]
    return w_std * ce_std + w_sat * ce_sat, ce_std.item(), ce_sat.item(), acc


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loss_equals_full_logits_reference(arch):
    model = tiny_model(arch)
    _, batch = make_batch()
    with torch.no_grad():
        loss, metrics = sdsat_loss(model, batch, LossConfig(w_std=0.5, w_sat=2.0, banned_ids=tuple(SATS)))
        ref_loss, ref_std, ref_sat, ref_acc = reference(model, batch, SATS, w_std=0.5, w_sat=2.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert metrics["ce_std"] == pytest.approx(ref_std, rel=1e-5)
    assert metrics["ce_sat"] == pytest.approx(ref_sat, rel=1e-5)
    assert metrics["sat_acc"] == pytest.approx(ref_acc)
    labels, offset = batch["labels"], batch["sat_offset"]
    assert metrics["n_std"] == int(((labels != IGNORE) & (offset == 0)).sum())
    assert metrics["n_sat"] == int(((labels != IGNORE) & (offset > 0)).sum())
    assert sum(metrics["sat_count"]) == metrics["n_sat"] and len(metrics["sat_count"]) == 4


def test_teacher_agreement_and_kl_equal_full_logits_reference():
    model = tiny_model()
    _, batch = make_batch(variable=True)
    cfg = LossConfig(w_std=0.0, w_sat=0.0, w_kl=1.0, banned_ids=tuple(SATS))
    loss, metrics = sdsat_loss(model, batch, cfg)
    logits = full_logits(model, batch, SATS)  # [B, T, V]
    labels, offset, positions = batch["labels"], batch["sat_offset"], batch["position_ids"]
    kl, agree = [], {i: [] for i in range(1, 5)}
    for b in range(labels.shape[0]):
        for q in range(labels.shape[1]):
            if offset[b, q] > 0 and labels[b, q] != IGNORE:
                teacher = logits[b, positions[b, q]].detach()  # standard position t+i
                student = logits[b, q]
                p = teacher.softmax(-1)
                kl.append((p * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum())
                agree[int(offset[b, q])].append(float(teacher.argmax() == student.argmax()))
    ref_kl = torch.stack(kl).mean()
    torch.testing.assert_close(loss, ref_kl, rtol=1e-4, atol=1e-6)
    assert metrics["kl_sat"] == pytest.approx(ref_kl.item(), rel=1e-4)
    assert metrics["sat_agree"] == pytest.approx([sum(v) / len(v) for v in agree.values()])
    loss.backward()
    embed_grad = model.get_input_embeddings().weight.grad
    assert torch.isfinite(embed_grad).all() and embed_grad[SATS].abs().sum(1).gt(0).all()


def test_sat_ids_are_never_predicted():
    model = tiny_model()
    with torch.no_grad():  # make SAT 252 the argmax everywhere: its LM-head row points along every hidden state
        model.lm_head.weight[252] = 1e3 * model.lm_head.weight[:240].mean(0)
    _, batch = make_batch()
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"]
        ).logits
        assert (logits.argmax(-1) == 252).float().mean() > 0.5  # the ban matters in this batch
        _, banned = sdsat_loss(model, batch, LossConfig(banned_ids=tuple(SATS)))
        _, inferred = sdsat_loss(model, batch, LossConfig())  # the SAT ids present in the batch
        _, ref_std, ref_sat, ref_acc = reference(model, batch, SATS)
    for metrics in (banned, inferred):
        assert metrics["ce_sat"] == pytest.approx(ref_sat, rel=1e-5)
        assert metrics["ce_std"] == pytest.approx(ref_std, rel=1e-5)
        assert metrics["sat_acc"] == pytest.approx(ref_acc)
    assert banned["ce_sat"] < 20  # without the ban the CE would be in the thousands


def test_accuracy_and_ce_of_a_model_that_always_says_7():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        bias = torch.zeros(model.lm_head.out_features)
        bias[7] = 1.0
        model.lm_head.bias = torch.nn.Parameter(bias)  # logits: 1 for token 7, 0 elsewhere
    rows = [build_row([7] * 12, SATS, RowConfig(num_sat=3, poisson_lambda=4.0), random.Random(s)) for s in range(3)]
    with torch.no_grad():
        _, metrics = sdsat_loss(model, collate(rows, 0, torch.float32), LossConfig(num_sat=5))
    assert metrics["sat_acc"][:3] == [1.0, 1.0, 1.0] and metrics["sat_agree"][:3] == [1.0, 1.0, 1.0]
    assert math.isnan(metrics["sat_acc"][3]) and metrics["sat_count"][3:] == [0, 0]
    expected_ce = math.log(math.e + (256 - 1 - 3)) - 1.0  # 3 SAT ids in the batch are banned
    assert metrics["ce_std"] == pytest.approx(expected_ce) and metrics["ce_sat"] == pytest.approx(expected_ce)


def test_gradients_are_finite_and_reach_sat_embeddings():
    model = tiny_model()
    model.train()
    _, batch = make_batch(variable=True)
    loss, metrics = sdsat_loss(model, batch, LossConfig())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    embed_grad = model.get_input_embeddings().weight.grad  # [V, H]
    assert embed_grad[SATS].abs().sum(1).gt(0).all()  # every SAT's input row learns
    assert model.lm_head.weight.grad[SATS].abs().sum() == 0  # banned outputs get no gradient
    assert metrics["n_sat"] > 0 and metrics["n_std"] > 0


def test_standard_weight_zero_trains_only_through_sat_labels():
    model = tiny_model()
    _, batch = make_batch()
    loss, metrics = sdsat_loss(model, batch, LossConfig(w_std=0.0, banned_ids=tuple(SATS)))
    assert loss.item() == pytest.approx(metrics["ce_sat"]) and metrics["ce_std"] > 0
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    reference(model, batch, SATS, w_std=0.0)[0].backward()
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_bf16_weights_and_bf16_autocast_give_finite_losses():
    model = tiny_model().to(torch.bfloat16)
    _, batch = make_batch(dtype=torch.bfloat16)
    loss, metrics = sdsat_loss(model, batch, LossConfig(w_kl=1.0))
    loss.backward()
    assert math.isfinite(loss.item()) and math.isfinite(metrics["ce_sat"])
    for attn in ("eager", "sdpa"):  # fp32 weights, fp32 mask, bf16 autocast (mixed-precision training)
        model = tiny_model()
        model.set_attn_implementation(attn)
        _, batch = make_batch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, metrics = sdsat_loss(model, batch, LossConfig(w_kl=1.0))
        loss.backward()
        assert metrics["ce_std"] == pytest.approx(reference(model, batch, SATS)[1], rel=0.02)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="weights"):
        LossConfig(w_std=0, w_sat=0)
    with pytest.raises(ValueError, match="weights"):
        LossConfig(w_std=-1)
    with pytest.raises(ValueError, match="w_kl=-1"):
        LossConfig(w_kl=-1)
    model = tiny_model()
    _, batch = make_batch(k=4)
    with pytest.raises(ValueError, match="num_sat=2"):
        sdsat_loss(model, batch, LossConfig(num_sat=2))


@pytest.mark.slow
def test_default_model_loss_and_standard_logits(default_fp32):
    model, sat = default_fp32.model, default_fp32.sat
    tok = default_fp32.tokenizer
    texts = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.path.join('a', 'b'))\n"]
    seqs = [tok.encode(t, add_special_tokens=False) for t in texts]
    rng = random.Random(0)
    rows = [build_row(x, sat.ids_for(5), RowConfig(num_sat=5, poisson_lambda=6.0), rng) for x in seqs]
    batch = collate(rows, tok.pad_token_id, torch.float32)
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"]
        ).logits
        for b, x in enumerate(seqs):
            plain = model(input_ids=torch.tensor([x])).logits[0]
            torch.testing.assert_close(out[b, : len(x)], plain, rtol=1e-4, atol=1e-4)
    loss, metrics = sdsat_loss(model, batch, LossConfig(banned_ids=tuple(sat.unique_ids)))
    loss.backward()
    assert math.isfinite(loss.item()) and 0 < metrics["ce_std"] < 10
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
