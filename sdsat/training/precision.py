"""Which dtype training and self-distillation compute in: bf16 where the hardware runs it
natively, fp32 where bf16 would be emulated.

On a CPU without AVX512-BF16 or AMX-BF16 (an AVX2-only one), bf16 matmuls are emulated: the
no-argument fine-tune there ran 121-149 s per step in bf16 and its bf16 self-distillation
took 22.7 minutes, while fp32 passes over several tokens cost a fraction of bf16 ones
(ENVIRONMENT.md). ``auto`` picks bf16 on such hardware only; an explicit value always wins.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device, flags: set[str] | None = None) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def choose_bf16(requested: str, device: torch.device, flags: set[str] | None = None) -> tuple[bool, str]:
    """(use bf16, why) for a requested "auto", "bf16"/"bfloat16" or "fp32"/"float32"."""
    if requested in ("bf16", "bfloat16"):
        return True, "bf16 as configured"
    if requested in ("fp32", "float32"):
        return False, "fp32 as configured"
    if requested != "auto":
        raise ValueError(f"unknown precision {requested!r}; choose auto, bf16 or fp32")
    if native_bf16(device, flags):
        return True, f"auto: bf16 ({device.type} runs bf16 natively)"
    what = "this GPU has no bf16" if device.type == "cuda" else f"this CPU has none of {', '.join(NATIVE_BF16_FLAGS)}: bf16 would be emulated"
    return False, f"auto: fp32 ({what})"


def resolve_precision(requested: str, device: torch.device, what: str) -> str:
    """"bf16" or "fp32" for ``requested``; logs the choice (what: "training", "self-distillation")."""
    bf16, why = choose_bf16(requested, device)
    log.info("%s computes in %s", what, why)
    return "bf16" if bf16 else "fp32"
