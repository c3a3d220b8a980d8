"""Which dtype training and self-distillation compute in: bf16 where the hardware runs it
natively, fp32 where bf16 would be emulated.

On a CPU without AVX512-BF16 or AMX-BF16 (an AVX2-only one), bf16 matmuls are emulated: the
no-argument fine-tune there ran 121-149 s per step in bf16 and its bf16 self-distillation
took 22.7 minutes, while fp32 passes over several tokens cost a fraction of bf16 ones
(measured on this project's machines). ``auto`` picks bf16 where it is native only (a kernel
cap, sdsat/hardware.py, counts); an explicit value always wins.
"""

from __future__ import annotations

import logging

import torch

from ..hardware import NATIVE_BF16_FLAGS, cpu_flags, isa_cap, native_bf16_cpu

__all__ = ["choose_bf16", "cpu_flags", "native_bf16", "resolve_precision"]

log = logging.getLogger(__name__)


def native_bf16(device: torch.device, flags: set[str] | None = None) -> bool:
    """bf16 runs natively on this device (on a CPU: :func:`sdsat.hardware.native_bf16_cpu`,
    which also honours an ``ONEDNN_MAX_CPU_ISA`` cap)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return native_bf16_cpu(flags)


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
    if device.type == "cuda":
        what = "this GPU has no bf16"
    elif native_bf16_cpu(flags, environ={}):  # the CPU has it: a kernel cap took it away
        what = f"the kernel cap ONEDNN_MAX_CPU_ISA={isa_cap()} leaves this CPU no native bf16: bf16 would be emulated"
    else:
        what = f"this CPU has none of {', '.join(NATIVE_BF16_FLAGS)}: bf16 would be emulated"
    return False, f"auto: fp32 ({what})"


def resolve_precision(requested: str, device: torch.device, what: str) -> str:
    """"bf16" or "fp32" for ``requested``; logs the choice (what: "training", "self-distillation")."""
    bf16, why = choose_bf16(requested, device)
    log.info("%s computes in %s", what, why)
    return "bf16" if bf16 else "fp32"
