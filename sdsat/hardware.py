"""What the CPU runs natively: its feature flags, and a kernel cap set in the environment.

oneDNN (torch's CPU matmul library) can be told to use no instruction set above a level:
``ONEDNN_MAX_CPU_ISA=AVX2`` (with ``ATEN_CPU_CAPABILITY=avx2`` for torch's own kernels) makes
a CPU with AVX512-BF16 compute like an AVX2-only one. bf16 matmuls are then emulated: a
6-token pass costs about 2.5x a 1-token pass instead of about 1.1x. That is how this project
measures the other CPU kind on one machine, so everything that asks "is bf16 native here?"
(the training precision, the benchmarks' machine record) must see the cap too.

No torch import: the HTTP load test records its machine without loading torch.
"""

from __future__ import annotations

import os
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ISA_CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# oneDNN ISA levels below AVX512_CORE_BF16: bf16 matmuls are emulated under these caps.
NO_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def isa_cap(environ: dict | None = None) -> str | None:
    """The oneDNN instruction-set cap set in the environment (upper case), None when unset."""
    environ = os.environ if environ is None else environ
    for name in ISA_CAP_VARS:
        value = environ.get(name, "").strip()
        if value:
            return value.upper()
    return None


def native_bf16_cpu(flags: set[str] | None = None, environ: dict | None = None) -> bool:
    """True where this CPU computes bf16 matmuls natively: it has AVX512-BF16 or AMX-BF16 and
    no ``ONEDNN_MAX_CPU_ISA`` cap below them."""
    flags = cpu_flags() if flags is None else flags
    if isa_cap(environ) in NO_BF16_ISAS:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)
