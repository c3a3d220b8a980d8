"""CPU kernel choice per pass width (sdsat/decode/kernels.py): from injected timings, no clock."""

from __future__ import annotations

import pytest
import torch

from sdsat.decode.generate import generate, make_sequences
from sdsat.decode.scheduler import Scheduler
from sdsat.decode.kernels import applies, choose_kernels, crossover, packing_pays, remove_kernel_choice
from sdsat.decode.packed import PackedLinears, pack, supported
from sdsat.engine.engine import Engine, EngineConfig
from tests.conftest import TinyTokenizer, tiny_loaded, tiny_model
from sdsat.model.load import LoadedModel


def times(aten: dict, onednn: dict) -> dict:
    return {n: {"aten": aten[n], "onednn": onednn[n]} for n in aten}


def test_crossover_switches_where_aten_stops_being_faster():
    # the shape measured on a native-bf16 CPU: ATen wins narrow passes, oneDNN wide ones
    measured = times({1: 26, 2: 31, 4: 55, 6: 70, 16: 160}, {1: 50, 2: 48, 4: 60, 6: 52, 16: 70})
    assert crossover(measured) == 4
    # oneDNN everywhere as fast or faster: torch's default stays
    assert crossover(times({1: 30, 6: 90}, {1: 30, 6: 50})) == 0
    # within the noise margin: no switch
    assert crossover(times({1: 29.5, 6: 60}, {1: 30, 6: 60})) == 0
    # oneDNN capped below native bf16: near-ties count for neither side, clear ATen wins do
    assert crossover(times({1: 28, 4: 40, 16: 140}, {1: 29, 4: 48, 16: 145})) == 4
    # a size where ATen's lead is within the noise margin ends nothing but does not count
    assert crossover(times({1: 26, 2: 31, 3: 46, 4: 46, 6: 88}, {1: 53, 2: 55, 3: 52, 4: 47, 6: 66})) == 3


def bf16_tiny() -> LoadedModel:
    loaded = tiny_loaded("llama", k=4)
    loaded.model.to(torch.bfloat16)
    return loaded


def probe(model) -> list[bool]:
    """Record oneDNN's switch as every decoder layer's forward sees it."""
    seen = []
    model.get_decoder().layers[0].register_forward_pre_hook(lambda m, a: seen.append(torch.backends.mkldnn.enabled))
    return seen


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_installed_choice_switches_kernels_by_pass_tokens_and_comes_off():
    loaded = bf16_tiny()
    fake = {1: (50.0, 26.0), 2: (48.0, 31.0), 4: (60.0, 55.0), 6: (52.0, 70.0)}  # tokens -> (oneDNN, ATen) ms
    choice = choose_kernels(loaded, sizes=tuple(fake), reps=1, timer=lambda n, kernel: fake[n][0 if kernel != "aten" else 1] / 1000)
    assert choice.aten_max_tokens == 4 and choice.reason == "measured" and not choice.packed
    assert choice.measured_ms[1]["onednn"] == 50.0 and choice.measured_ms[1]["aten"] == 26.0
    seen = probe(loaded.model)
    with torch.no_grad():
        loaded.model(torch.tensor([[5, 6, 7]]))  # 3 tokens: ATen
        loaded.model(torch.tensor([[5, 6, 7, 8, 9, 10]]))  # 6 tokens: oneDNN
        loaded.model(torch.tensor([[5, 6], [7, 8], [9, 10]]))  # 3 rows x 2 = 6 tokens: oneDNN
    assert seen == [False, True, True]
    remove_kernel_choice(loaded.model)
    assert torch.backends.mkldnn.enabled  # torch's default again
    with torch.no_grad():
        loaded.model(torch.tensor([[5]]))
    assert seen[-1] is True  # no hook switches it any more


def test_choice_applies_to_cpu_bf16_only_and_leaves_fp32_alone():
    fp32 = tiny_loaded("llama", k=4)
    assert "float32" in applies(fp32.model)
    calls = []
    choice = choose_kernels(fp32, timer=lambda n, kernel: calls.append(n) or 1.0)
    assert choice.aten_max_tokens == 0 and "float32" in choice.reason and not calls  # nothing timed


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_decoding_under_the_choice_equals_plain_decoding_under_it():
    # The hook switches kernels between 1-token plain steps and wide drafting passes; the
    # drafting decoder's output stays the plain decoder's (this tiny bf16 model has no near-tie here).
    prompt = [3, 17, 42, 9, 77, 5]
    loaded = bf16_tiny()
    choose_kernels(loaded, sizes=(1, 2, 8), reps=1, timer=lambda n, kernel: (1.0 if kernel != "aten" else 0.5) if n <= 2 else (0.5 if kernel != "aten" else 1.0))
    seen = probe(loaded.model)
    try:
        plain = generate(loaded, make_sequences(loaded, [prompt], 24), num_sat=0)[0].output_ids
        drafted = generate(loaded, make_sequences(loaded, [prompt], 24), num_sat=4, scheduler=Scheduler(lambda rows, q: 1.0))[0].output_ids
    finally:
        remove_kernel_choice(loaded.model)
    assert False in seen and True in seen  # both kernels ran
    assert drafted == plain and len(plain) == 24


def test_engine_records_its_kernel_choice():
    loaded = LoadedModel(model=tiny_model("llama"), tokenizer=TinyTokenizer(), sat=None, source="tiny", path="")
    engine = Engine(loaded, EngineConfig(num_sat=0, lookup=0))
    try:
        kernels = engine.snapshot()["kernels"]
    finally:
        engine.stop()
    assert kernels == {"aten_max_tokens": 0, "packed": False, "reason": "float32: one kernel family"}


def test_packing_pays_only_when_faster_overall_and_nowhere_slower():
    def t(onednn, packed):
        return {n: {"onednn": o, "aten": 99.0, "packed": p} for n, (o, p) in enumerate(zip(onednn, packed), 1)}

    assert packing_pays(t([50, 52, 60], [30, 35, 50]))
    assert not packing_pays(t([50, 52, 60], [49, 51, 59]))  # within the margin: not worth a second copy
    assert not packing_pays(t([50, 52, 60], [30, 35, 70]))  # slower by more than the margin at one size
    assert not packing_pays({1: {"onednn": 50.0, "aten": 30.0}})  # not measured


@pytest.mark.skipif(supported() != "", reason="oneDNN cannot pack bf16 weights on this CPU (it needs AVX-512 or AVX-NE-CONVERT)")
def test_packed_layer_computes_the_linear_product():
    layer = torch.nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    packs = PackedLinears([layer])
    with torch.no_grad():
        plain = layer(x)
        packs.on = True
        packed = layer(x)
    exact = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert packed.shape == plain.shape and packed.dtype == torch.bfloat16
    assert torch.allclose(packed.float(), exact, atol=0.05, rtol=0.02)
    with torch.enable_grad():  # autograd never sees the packed product
        assert torch.equal(layer(x), plain)
    packs.remove()
    assert "forward" not in layer.__dict__ and not hasattr(layer, "_sdsat_packed")


@pytest.mark.skipif(supported() != "", reason="oneDNN cannot pack bf16 weights on this CPU (it needs AVX-512 or AVX-NE-CONVERT)")
def test_packed_choice_runs_wide_passes_on_packed_weights_and_decodes_as_plain():
    prompt = [3, 17, 42, 9, 77, 5]
    loaded = bf16_tiny()
    fake = {1: {"onednn": 1.0, "aten": 0.5, "packed": 0.6}, 8: {"onednn": 1.0, "aten": 2.0, "packed": 0.5}}
    choice = choose_kernels(loaded, sizes=(1, 8), reps=1, timer=lambda n, kernel: fake[n][kernel])
    assert choice.packed and choice.aten_max_tokens == 1 and choice.label() == "ATen <= 1 tokens, packed oneDNN above"
    packs = loaded.model.__dict__["_sdsat_packs"]
    seen = []
    loaded.model.get_decoder().layers[0].register_forward_pre_hook(lambda m, a: seen.append(packs.on))
    try:
        plain = generate(loaded, make_sequences(loaded, [prompt], 24), num_sat=0)[0].output_ids
        drafted = generate(loaded, make_sequences(loaded, [prompt], 24), num_sat=4, scheduler=Scheduler(lambda rows, q: 1.0))[0].output_ids
    finally:
        remove_kernel_choice(loaded.model)
    assert False in seen and True in seen  # 1-token steps on ATen, wide passes on the packed weights
    assert drafted == plain and len(plain) == 24
    assert "_sdsat_packs" not in loaded.model.__dict__ and not packs.layers  # the copies are gone


@pytest.mark.skipif(supported() != "", reason="oneDNN cannot pack bf16 weights on this CPU (it needs AVX-512 or AVX-NE-CONVERT)")
def test_slow_repetitions_do_not_veto_packing():
    """Interference only adds time: spikes in two of three repetitions (here on the packed
    kernel at 8 tokens, 40% slower than plain oneDNN) leave the choice as the fast one says."""
    loaded = bf16_tiny()
    fake = {1: {"onednn": 1.0, "aten": 0.5, "packed": 0.6}, 8: {"onednn": 1.0, "aten": 2.0, "packed": 0.7}}
    calls = []

    def timer(n, kernel):
        calls.append((n, kernel))
        spike = n == 8 and kernel == "packed" and calls.count((8, "packed")) > 2  # warm-up, 1st fast, then 2 slow
        return 1.4 if spike else fake[n][kernel]

    choice = choose_kernels(loaded, sizes=(1, 8), reps=3, timer=timer)
    try:
        assert choice.packed and choice.aten_max_tokens == 1 and choice.measured_ms[8]["packed"] == 700.0
    finally:
        remove_kernel_choice(loaded.model)


def test_packing_is_refused_where_memory_is_short_and_dropped_where_it_does_not_pay():
    loaded = bf16_tiny()
    packs, why = pack(loaded.model, available=1024)
    assert packs is None and "exceeds 25% of the available memory" in why
    flat = {n: {"onednn": 1.0, "aten": 1.0, "packed": 1.0} for n in (1, 8)}
    choice = choose_kernels(loaded, sizes=(1, 8), reps=1, timer=lambda n, kernel: flat[n][kernel])
    # where oneDNN cannot pack (an AVX2-only CPU) the record says so and nothing is packed
    assert not choice.packed and choice.packing == (supported() or "measured: packing did not pay")
    assert not any("forward" in m.__dict__ for m in loaded.model.modules())  # unpacked again


def test_a_compiled_forward_is_not_packed():
    from sdsat.decode.compiled import compile_decode

    loaded = bf16_tiny()
    compile_decode(loaded.model)  # compiles lazily, at the first call: none happens here
    fake = {1: {"onednn": 1.0, "aten": 0.5, "packed": 0.1}, 8: {"onednn": 1.0, "aten": 2.0, "packed": 0.1}}
    choice = choose_kernels(loaded, sizes=(1, 8), reps=1, timer=lambda n, kernel: fake[n][kernel])
    try:
        assert not choice.packed and choice.packing == "not packed: the model's forward is compiled"
        assert not any("forward" in m.__dict__ for m in loaded.model.get_decoder().modules())
    finally:
        remove_kernel_choice(loaded.model)
