"""oneDNN linear layers whose weights are packed once, not on every call.

torch's bf16 linear layer on a CPU hands oneDNN a plain row-major weight, and oneDNN
reorders it into its blocked layout on every call: a pass reads and writes every weight of
the model once more than its products need. :class:`PackedLinears` keeps a second copy of
each bf16/fp16 linear weight of the decoder and the LM head, reordered once (what
inductor's weight freezing does), and while :attr:`PackedLinears.on` is set the layers
compute through it. Which passes use it is the kernel choice's business
(:mod:`sdsat.decode.kernels`, measured per pass width).

The copies cost the linear weights' size again in memory, so :func:`pack` refuses a model
whose linear weights exceed a quarter of the memory available. They are a snapshot: change
the weights afterwards (load others, train) and :meth:`PackedLinears.remove` first. Only
inference passes use them (autograd has no rule for the packed product); under
``torch.enable_grad`` the layers compute as before.
"""

from __future__ import annotations

from functools import lru_cache, partial

import torch
import torch.nn.functional as F

DTYPES = (torch.bfloat16, torch.float16)
MEMORY_SHARE = 0.25  # the packed copies may take at most this share of the available memory


@lru_cache(maxsize=None)
def supported(dtype: torch.dtype = torch.bfloat16) -> str:
    """"" where this torch and CPU can pack linear weights of ``dtype`` for oneDNN, else why
    not (oneDNN packs bf16 only where the CPU has AVX-512 or AVX-NE-CONVERT)."""
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return "this torch has no packed oneDNN linear"
    try:
        ops._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), None)
    except RuntimeError as exc:
        return "oneDNN cannot pack here: " + str(exc).splitlines()[0]
    return ""


def linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The decoder's and the LM head's linear layers in a packable dtype, on the CPU."""
    found = [m for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        found.append(head)
    return [m for m in found if m.weight.dtype in DTYPES and m.weight.device.type == "cpu"]


class PackedLinears:
    """A packed copy of every layer in ``layers``; the layers use it while ``on`` is True."""

    def __init__(self, layers: list[torch.nn.Linear]):
        self.on = False
        self.layers = layers
        # every copy first, so that a layer oneDNN cannot pack leaves no layer changed
        copies = [torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None) for layer in layers]
        for layer, packed in zip(layers, copies):
            layer._sdsat_packed = packed
            layer.forward = partial(_forward, layer, self)  # an instance attribute: hooks still run

    def remove(self) -> None:
        """Give the layers back their own forward and free the copies."""
        for layer in self.layers:
            del layer.forward, layer._sdsat_packed
        self.layers, self.on = [], False


def _forward(layer: torch.nn.Linear, packs: PackedLinears, x: torch.Tensor) -> torch.Tensor:
    if packs.on and not torch.is_grad_enabled():
        return torch.ops.mkldnn._linear_pointwise(x, layer._sdsat_packed, layer.bias, "none", [], "")
    return F.linear(x, layer.weight, layer.bias)


def available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pack(model: torch.nn.Module, available: int | None = None) -> tuple[PackedLinears | None, str]:
    """Pack the model's linear layers: (the packs, "") or (None, why not)."""
    if hasattr(model.forward, "_torchdynamo_orig_callable"):  # compile_decode: inductor packs its own
        return None, "not packed: the model's forward is compiled"
    layers = linears(model)
    if not layers:
        return None, "no bf16/fp16 linear layers on the CPU"
    size = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    available = available_memory() if available is None else available
    if available is not None and size > MEMORY_SHARE * available:
        return None, f"not packed: a second copy of the linear weights ({size >> 20} MiB) exceeds {MEMORY_SHARE:.0%} of the available memory ({available >> 20} MiB)"
    why = supported(layers[0].weight.dtype)
    if why:
        return None, why
    try:
        return PackedLinears(layers), ""
    except RuntimeError as exc:  # a shape or dtype oneDNN cannot pack
        return None, f"not packed: {exc}".splitlines()[0]
