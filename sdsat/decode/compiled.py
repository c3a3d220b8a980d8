"""An optional ``torch.compile`` of the decode step (off by default; meant for GPUs).

The model's forward (what every decode pass calls; prefill runs the decoder alone and stays
eager) is compiled with dynamic shapes, because the KV length grows on every pass and the
query length varies with the drafts: one graph serves them all after a few recompiles. The
output is the same tokens as the eager model (tests/test_gpu_serving.py checks it on CPU).
CUDA graphs (``mode="reduce-overhead"``) are not used: they record one graph per shape, and
the cache's length changes every pass; they would need a fixed-length cache with a
length mask instead.
"""

from __future__ import annotations

import torch

MODES = ("default", "max-autotune-no-cudagraphs")


def compile_decode(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """Replace ``model.forward`` by its compiled form (in place); return the model."""
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r} is not supported; choose one of {', '.join(MODES)}")
    if next(model.parameters()).device.type == "cpu":
        # inductor's AVX-512 C++ kernels for the decode step abort the process on an Intel Xeon
        # with avx512_bf16 + avx512_fp16 (torch 2.13, a tiny fp32 Llama); capped at 256-bit
        # vectors (AVX2), as ATEN_CPU_CAPABILITY=avx2 also caps them, they run and match
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = 256
    model.forward = torch.compile(model.forward, dynamic=True, mode=mode)
    return model
