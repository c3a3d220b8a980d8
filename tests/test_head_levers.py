"""jobs/head_levers.py: the cached features line up with the training layout, and a lever run reports per offset."""

from __future__ import annotations

import random

import torch

from jobs.head_levers import BASE, CANDIDATES, accuracy, extract, train, training_set
from tests.conftest import tiny_loaded

K = 3


def _rows(n: int, length: int = 40) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1, 200) for _ in range(length)] for _ in range(n)]


def test_features_hold_the_teacher_and_previous_token_of_each_sat_position():
    loaded = tiny_loaded(k=K)
    rows = _rows(3)
    data = extract(loaded, rows, K, seed=0)
    n = data["h"].shape[0]
    assert n > 0 and all(v.shape[0] == n for v in data.values())
    with torch.no_grad():
        plain = [loaded.model(torch.tensor([r])).logits[0] for r in rows]  # [L, V] each
        hidden = [loaded.model.get_decoder()(torch.tensor([r])).last_hidden_state[0] for r in rows]
    for j in range(n):
        row, off = int(data["row"][j]), int(data["off"][j])
        anchor = int(torch.nonzero((hidden[row] - data["f"][j]).abs().amax(-1) < 1e-4)[0])
        target = plain[row][anchor + off].clone()
        target[loaded.sat.unique_ids] = float("-inf")
        assert int(data["teach"][j]) == int(target.argmax())  # the base model's argmax at t+i
        assert int(data["prev"][j]) == rows[row][anchor + off]  # the token before that target
        assert 1 <= off <= K


def test_a_lever_run_reports_accuracy_per_offset_and_learns():
    loaded = tiny_loaded(k=K)
    data = {"train": extract(loaded, _rows(12), K, seed=0), "val": extract(loaded, _rows(12), K, seed=0)}
    lm = loaded.model.lm_head.weight.detach()
    embed = loaded.model.get_input_embeddings().weight.detach()
    fresh = accuracy(train(BASE | {"epochs": 0.0, "lr": 0.0}, data, lm, embed, loaded.sat.unique_ids, 0), lm,
                     loaded.sat.unique_ids, data["val"], K)
    assert fresh["full"] == fresh["sat"]  # a fresh head guesses what the SATs guess
    trained = accuracy(train(BASE | {"epochs": 30.0, "lr": 3e-3}, data, lm, embed, loaded.sat.unique_ids, 0), lm,
                       loaded.sat.unique_ids, data["val"], K)
    assert set(trained) == {"full", "sat", *(f"top{m}" for m in CANDIDATES)} and all(len(v) == K for v in trained.values())
    assert sum(trained["full"]) > sum(fresh["full"])  # on the rows it trained on, it learned them


def test_extra_rows_are_added_or_take_the_place_of_as_many_training_rows():
    loaded = tiny_loaded(k=K)
    data = {"train": extract(loaded, _rows(8), K, seed=0), "extra": extract(loaded, _rows(3, 30), K, seed=2)}

    def rows_of(selected: dict) -> set[tuple[int, int]]:
        return set(zip(selected["source"].tolist(), selected["row"].tolist()))

    base = rows_of(training_set(BASE, data))
    added = rows_of(training_set(BASE | {"extra": "add"}, data))
    swapped = rows_of(training_set(BASE | {"extra": "swap"}, data))
    extra = {(1, r) for r in range(3)}
    assert base == {(0, r) for r in range(8)}
    assert added == base | extra
    assert swapped == {(0, r) for r in range(5)} | extra and len(swapped) == len(base)
