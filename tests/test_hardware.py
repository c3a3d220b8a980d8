"""What counts as native bf16: CPU flags and a oneDNN kernel cap in the environment."""

import subprocess
import sys

import pytest
import torch

from sdsat.hardware import isa_cap, native_bf16_cpu
from sdsat.training.precision import choose_bf16

BF16_CPU = {"avx2", "avx512f", "avx512_bf16"}


@pytest.mark.parametrize(
    "environ, flags, expected",
    [
        ({}, BF16_CPU, True),
        ({}, {"avx2"}, False),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, BF16_CPU, False),  # the cap makes bf16 emulated
        ({"ONEDNN_MAX_CPU_ISA": "avx512_core"}, BF16_CPU, False),  # below AVX512_CORE_BF16, any case
        ({"DNNL_MAX_CPU_ISA": "AVX2"}, {"amx_bf16"}, False),  # oneDNN's older name
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, BF16_CPU, True),
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, BF16_CPU, True),
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, {"avx2"}, False),  # a cap adds nothing the CPU lacks
    ],
)
def test_native_bf16_needs_the_flags_and_no_cap_below_them(environ, flags, expected):
    assert native_bf16_cpu(flags, environ) == expected


def test_isa_cap_reads_either_variable_and_ignores_blank_values():
    assert isa_cap({}) is None
    assert isa_cap({"ONEDNN_MAX_CPU_ISA": " "}) is None
    assert isa_cap({"DNNL_MAX_CPU_ISA": "avx2"}) == "AVX2"


def test_auto_precision_follows_the_cap(monkeypatch):
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert choose_bf16("auto", torch.device("cpu"), BF16_CPU)[0]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    bf16, why = choose_bf16("auto", torch.device("cpu"), BF16_CPU)
    assert not bf16 and "ONEDNN_MAX_CPU_ISA=AVX2" in why and "emulated" in why
    assert choose_bf16("bf16", torch.device("cpu"), BF16_CPU)[0]  # an explicit choice still wins


def test_machine_record_names_the_cap_without_importing_torch():
    code = ("import json, sys; from jobs.report import machine_info; m = machine_info(); "
            "print(json.dumps([m.get('isa_cap'), m['native_bf16'], 'torch' in sys.modules]))")
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=".")
    assert out.stdout.strip() == '["AVX2", false, false]'
