"""jobs/near_tie.py: its teacher forcing lines up with a plain forward over the whole sequence."""

import pytest
import torch

from jobs.near_tie import teacher_forced
from tests.conftest import tiny_model


@pytest.mark.parametrize("width", [1, 6])
def test_teacher_forced_logits_are_the_full_forwards_from_the_last_prompt_token(width):
    model = tiny_model("llama")
    ids, start = [5, 9, 13, 2, 77, 31, 8, 90, 14, 3, 66], 4
    got = teacher_forced(model, ids, start, width, onednn=True)
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0].float()
    assert got.shape[0] == len(ids) - start + 1
    torch.testing.assert_close(got, full[start - 1 :], rtol=1e-4, atol=1e-4)
