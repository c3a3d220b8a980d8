"""Training rows: layout, labels, positions, the attention mask cell by cell, and logits.

The property that matters (docs/design.md, "Training"): in an augmented, padded batch the
standard tokens' logits equal a plain forward of the standard sequence, and SAT i of an
anchor t sees exactly x_0..x_t, sat_1..sat_i.
"""

from __future__ import annotations

import random

import pytest
import torch

from sdsat.training.rows import IGNORE, RowConfig, allowed, build_row, collate, poisson
from tests.conftest import tiny_model

SATS = [250, 251, 252, 253]
MIN = torch.finfo(torch.float32).min


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 240) for _ in range(n)]


def make_rows(lengths, k=3, lam=3.0, variable=False, sat_ids=SATS, seed=0):
    rng = random.Random(seed)
    cfg = RowConfig(num_sat=k, poisson_lambda=lam, variable_length=variable)
    seqs = [random_tokens(rng, n) for n in lengths]
    return seqs, [build_row(s, sat_ids, cfg, rng) for s in seqs]


def blocks(row):
    """{block: (anchor, [sat offsets])} read back from a row."""
    out = {}
    for pos, off, b in zip(row["position_ids"], row["sat_offset"], row["block_id"]):
        if b >= 0:
            out.setdefault(b, (pos - off, []))[1].append(off)
    return out


def reference_allowed(row) -> list[list[bool]]:
    """The docs/design.md rules written cell by cell, independently of sdsat.training.rows."""
    n = len(row["input_ids"])
    std_len = row["block_id"].count(-1)
    grid = [[False] * n for _ in range(n)]
    for q in range(n):
        for j in range(n):
            if q < std_len:
                grid[q][j] = j < std_len and j <= q
            else:
                anchor = row["position_ids"][q] - row["sat_offset"][q]
                same = row["block_id"][j] == row["block_id"][q]
                grid[q][j] = (j < std_len and j <= anchor) or (same and row["sat_offset"][j] <= row["sat_offset"][q])
    return grid


def test_row_layout_positions_and_labels():
    seqs, rows = make_rows([20], k=3, lam=4.0)
    x, row = seqs[0], rows[0]
    assert row["input_ids"][:20] == x
    assert row["position_ids"][:20] == list(range(20))
    assert row["labels"][:20] == x[1:] + [IGNORE]
    assert row["sat_offset"][:20] == [0] * 20
    found = blocks(row)
    assert len(found) >= 1 and len(row["input_ids"]) == 20 + 3 * len(found)
    for start in range(20, len(row["input_ids"]), 3):
        t = row["position_ids"][start] - 1
        assert 0 <= t <= 18
        assert row["input_ids"][start : start + 3] == SATS[:3]
        assert row["sat_offset"][start : start + 3] == [1, 2, 3]
        assert row["position_ids"][start : start + 3] == [t + 1, t + 2, t + 3]
        expected = [x[t + i + 1] if t + i + 1 < 20 else IGNORE for i in (1, 2, 3)]
        assert row["labels"][start : start + 3] == expected


def test_anchor_at_the_end_has_ignored_labels():
    x = list(range(10, 16))  # L = 6
    row = build_row(x, SATS, RowConfig(num_sat=3, poisson_lambda=200.0, max_blocks=64), random.Random(1))
    ends = [s for s in range(6, len(row["input_ids"]), 3) if row["position_ids"][s] - 1 == 4]
    assert ends, "with 64 anchors in [0, 4] one sits at L-2"
    assert row["labels"][ends[0] : ends[0] + 3] == [IGNORE] * 3


def test_block_count_is_clipped_poisson():
    rng = random.Random(0)
    x = list(range(1, 30))
    tiny = RowConfig(num_sat=2, poisson_lambda=1e-3, max_blocks=5)
    huge = RowConfig(num_sat=2, poisson_lambda=1e3, max_blocks=5)
    assert all(len(blocks(build_row(x, SATS, tiny, rng))) == 1 for _ in range(5))
    assert all(len(blocks(build_row(x, SATS, huge, rng))) == 5 for _ in range(5))
    draws = [poisson(rng, 12.0) for _ in range(4000)]
    assert abs(sum(draws) / len(draws) - 12.0) < 0.5  # mean of Poisson(12); std of the mean ~0.05


def test_variable_length_blocks_and_repeated_ids():
    _, rows = make_rows([40] * 4, k=4, lam=12.0, variable=True, sat_ids=[250] * 4)
    lengths = [len(offs) for row in rows for _, offs in blocks(row).values()]
    assert set(lengths) <= {1, 2, 3, 4} and len(set(lengths)) > 1
    for row in rows:
        assert all(offs == list(range(1, len(offs) + 1)) for _, offs in blocks(row).values())
        assert {t for t, o in zip(row["input_ids"], row["sat_offset"]) if o} == {250}


def test_mask_on_a_hand_written_row():
    # x0 x1 x2 x3, then one block for anchor t=1: sat1 (pos 2), sat2 (pos 3).
    row = build_row([5, 6, 7, 8], SATS, RowConfig(num_sat=2, poisson_lambda=1e-3), random.Random(0))
    t = row["position_ids"][4] - 1
    mask = collate([row], 0, torch.float32)["attention_mask"][0, 0]
    sees = (mask == 0).tolist()
    expected = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [int(j <= t) for j in range(4)] + [1, 0],
        [int(j <= t) for j in range(4)] + [1, 1],
    ]
    assert sees == [[bool(v) for v in r] for r in expected]
    assert set(mask.unique().tolist()) == {0.0, MIN}


def test_mask_matches_rules_cell_by_cell_with_padding():
    _, rows = make_rows([9, 14, 5], k=3, lam=3.0, variable=True)
    batch = collate(rows, 0, torch.float32)
    mask = batch["attention_mask"]  # [B, 1, T, T]
    width = mask.shape[-1]
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        grid = reference_allowed(row)
        for q in range(width):
            for j in range(width):
                if q < n and j < n:
                    want = grid[q][j]
                else:
                    want = q == j  # pads: invisible to everyone, each sees only itself
                assert (mask[b, 0, q, j] == 0).item() == want, (b, q, j)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        assert (batch["labels"][b, n:] == IGNORE).all()
        assert (batch["input_ids"][b, n:] == 0).all()


def test_no_sat_is_visible_to_a_standard_token():
    _, rows = make_rows([30, 17, 25], k=4, lam=12.0)
    batch = collate(rows, 0, torch.float32)
    width = batch["input_ids"].shape[1]
    lengths = torch.tensor([len(r["input_ids"]) for r in rows])
    real = torch.arange(width)[None, :] < lengths[:, None]  # [B, T]
    is_std = real & (batch["sat_offset"] == 0)
    is_sat = batch["sat_offset"] > 0
    sees = batch["attention_mask"][:, 0] == 0  # [B, T, T]
    assert not (sees & is_std[:, :, None] & is_sat[:, None, :]).any()
    assert (sees & is_sat[:, :, None] & is_sat[:, None, :]).any()  # SATs do see their block


def test_mask_dtype_and_allowed_shape():
    _, rows = make_rows([8, 6])
    batch = collate(rows, 0, torch.bfloat16)
    assert batch["attention_mask"].dtype == torch.bfloat16
    assert batch["attention_mask"].min().item() == torch.finfo(torch.bfloat16).min
    block_id = torch.tensor([[-1, -1, 0, -2]])
    assert allowed(torch.tensor([[0, 1, 1, 0]]), torch.tensor([[0, 0, 1, 0]]), block_id).shape == (1, 4, 4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_standard_logits_equal_plain_forward(attn, arch):
    model = tiny_model(arch)
    model.set_attn_implementation(attn)
    seqs, rows = make_rows([23, 11, 17], k=4, lam=8.0, variable=True)
    batch = collate(rows, 0, torch.float32)
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"]
        ).logits  # [B, T, V]
        assert torch.isfinite(out).all()  # pad rows too
        for b, x in enumerate(seqs):
            plain = model(input_ids=torch.tensor([x])).logits[0]  # [L, V]
            torch.testing.assert_close(out[b, : len(x)], plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("sat_ids", [SATS, [250] * 4], ids=["distinct", "repeated"])
def test_sat_logits_equal_forward_of_prefix_and_block(attn, sat_ids):
    model = tiny_model()
    model.set_attn_implementation(attn)
    seqs, rows = make_rows([15, 21], k=4, lam=3.0, sat_ids=sat_ids)
    batch = collate(rows, 0, torch.float32)
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"]
        ).logits
        for b, (x, row) in enumerate(zip(seqs, rows)):
            for q in range(len(x), len(row["input_ids"])):
                t, i = row["position_ids"][q] - row["sat_offset"][q], row["sat_offset"][q]
                alone = model(input_ids=torch.tensor([x[: t + 1] + sat_ids[:i]])).logits[0, -1]
                torch.testing.assert_close(out[b, q], alone, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="num_sat"):
        RowConfig(num_sat=0)
    with pytest.raises(ValueError, match="poisson_lambda"):
        RowConfig(num_sat=2, poisson_lambda=0)
    with pytest.raises(ValueError, match="at least 2 standard tokens"):
        build_row([7], SATS, RowConfig(num_sat=2), random.Random(0))
    with pytest.raises(ValueError, match="SAT ids"):
        build_row([7, 8, 9], SATS[:2], RowConfig(num_sat=3), random.Random(0))
    with pytest.raises(ValueError, match="at least one row"):
        collate([], 0, torch.float32)
