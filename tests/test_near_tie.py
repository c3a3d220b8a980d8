"""jobs/near_tie.py: its teacher forcing lines up with a plain forward over the whole sequence."""

import pytest
import torch

from jobs.near_tie import teacher_forced
from sdsat.decode.packed import pack, supported
from tests.conftest import tiny_model


@pytest.mark.parametrize("width", [1, 6])
def test_teacher_forced_logits_are_the_full_forwards_from_the_last_prompt_token(width):
    model = tiny_model("llama")
    ids, start = [5, 9, 13, 2, 77, 31, 8, 90, 14, 3, 66], 4
    got = teacher_forced(model, ids, start, width, "onednn")
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0].float()
    assert got.shape[0] == len(ids) - start + 1
    torch.testing.assert_close(got, full[start - 1 :], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(supported() != "", reason="oneDNN cannot pack bf16 weights on this CPU (it needs AVX-512 or AVX-NE-CONVERT)")
def test_packed_variant_runs_on_the_packed_weights_and_agrees_up_to_bf16_rounding():
    model = tiny_model("llama").to(torch.bfloat16)
    packs, why = pack(model)
    assert packs is not None, why
    seen = []
    model.get_decoder().layers[0].register_forward_pre_hook(lambda m, a: seen.append(packs.on))
    ids, start = [5, 9, 13, 2, 77, 31, 8, 90, 14, 3, 66], 4
    packed = teacher_forced(model, ids, start, 6, "packed", packs)
    aten = teacher_forced(model, ids, start, 6, "aten", packs)
    assert seen == [True] * 3 + [False] * 3 and not packs.on  # prefix + 2 passes each
    torch.testing.assert_close(packed, aten, rtol=0.05, atol=0.05)
