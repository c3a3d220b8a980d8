"""A SAT-position adapter: low-rank deltas that act only where the input token is a SAT.

The base model stays frozen. Its decoder gets a forward pre-hook that records which
rows (flattened batch x sequence positions) of ``input_ids`` hold SAT ids; for that pass
every adapted linear layer adds ``scale * B(A(x))`` at those rows only (its forward is
wrapped, and given back after the pass), and the input embedding's output at those rows is
replaced by the adapter's own SAT embedding rows.

Standard tokens never attend to SATs (training masks, and decoding's draft pass drops the
SAT keys), so every standard token's hidden states and logits are exactly the base
model's, in training and in decoding: the model's own greedy output cannot change, and
the decoders need no change either (a pass without SATs runs the base model untouched).

Stored next to a checkpoint (or alone, as a small artifact) as ``sdsat_adapter.safetensors``;
its shape (rank, alpha, targets) lives in ``SATConfig.adapter``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

WEIGHTS_FILE = "sdsat_adapter.safetensors"
ATTR = "sdsat_adapter"  # the adapter's attribute on the model it is attached to
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Linear layers of one module that read the same input: at inference their rank-r products
# run as one fused pair of matrix products (fewer, larger products: cheaper on CPU).
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


@dataclass
class AdapterConfig:
    rank: int = 16
    alpha: float = 32.0  # deltas are scaled by alpha / rank
    targets: tuple[str, ...] = DEFAULT_TARGETS  # names of the adapted linear layers (last name part)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("adapter targets must name at least one linear layer")

    def to_dict(self) -> dict:
        return asdict(self) | {"targets": list(self.targets)}


class LowRank(torch.nn.Module):
    """x -> scale * B(A(x)); B starts at zero, so a fresh adapter changes nothing.
    (The hooks fold ``scale`` into the row mask: one op less per layer.)"""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.empty(rank, d_in))  # [r, d_in]
        self.b = torch.nn.Parameter(torch.zeros(d_out, rank))  # [d_out, r]
        torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a), self.b) * self.scale


class SATAdapter(torch.nn.Module):
    """Low-rank deltas and SAT embedding rows, active only at SAT positions."""

    def __init__(self, model: torch.nn.Module, sat_ids: list[int], cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.sat_ids = sorted(set(sat_ids))
        embed = model.get_input_embeddings()
        # [n_sat, H]: starts as the model's own SAT rows
        self.sat_embed = torch.nn.Parameter(embed.weight.detach()[self.sat_ids].clone().float())
        self.deltas = torch.nn.ModuleDict()
        self._linears: dict[str, torch.nn.Linear] = {}
        self._group_of: dict[str, str] = {}  # delta key -> its shared-input group
        # (parameter versions, {group: (A [sum r, d_in], scale x B [sum d_out, sum r])})
        self._fused: tuple | None = None
        self._slice_of: dict[str, slice] = {}  # delta key -> its columns of the group's fused output
        self._pass_cache: dict = {}  # group -> (input tensor, fused low-rank output) during a pass
        for name, module in model.get_decoder().named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in cfg.targets:
                key = name.replace(".", "__")
                self.deltas[key] = LowRank(module.in_features, module.out_features, cfg.rank, cfg.alpha / cfg.rank)
                self._linears[key] = module
                parent, _, last = key.rpartition("__")
                self._group_of[key] = f"{parent}__{SHARED_INPUT.get(last, last)}"
        if not self.deltas:
            raise ValueError(f"adapter targets {cfg.targets} match no linear layer of {type(model).__name__}")
        # A tuple, so the model's own modules are not registered as the adapter's submodules.
        self._hosts = (embed, model.get_decoder())
        self._rows: torch.Tensor | None = None  # [n] flat row indices of SAT tokens in this pass
        self._run: slice | None = None  # the same rows as a slice, where they are consecutive
        self._slots: torch.Tensor | None = None  # [n] index into sat_embed of each such row
        self._row_mask: torch.Tensor | None = None  # [B, T, 1] bool: SAT positions (training only)
        self._row_scale: torch.Tensor | None = None  # [B, T, 1]: alpha / rank at SAT positions, else 0 (training only)
        self._handles: list = []
        self._pass_handles: list = []
        self._wrapped: list = []  # (linear, its own instance forward or None) while a pass holds SATs

    # --- hooks ---
    def attach(self) -> None:
        """Register the decoder hooks. The per-layer work exists only during a pass that holds
        SATs, so a pass without SATs (plain decoding, verification, the standard tokens in
        training) runs the base model with no extra work at all."""
        lookup = torch.full((max(self.sat_ids) + 1,), -1, dtype=torch.long)
        lookup[self.sat_ids] = torch.arange(len(self.sat_ids))
        self.register_buffer("_lookup", lookup, persistent=False)
        decoder = self._hosts[1]
        self._handles = [
            decoder.register_forward_pre_hook(self._find_sat_rows, with_kwargs=True),
            decoder.register_forward_hook(lambda *_: self._end_pass(), always_call=True),
        ]

    def detach(self) -> None:
        self._end_pass()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _begin_pass(self) -> None:
        """Wrap each adapted layer's forward for this pass (a forward hook per layer costs
        several times the wrapper's call on a CPU); a forward the layer already has as an
        instance attribute (packed kernels, :mod:`sdsat.decode.packed`) runs inside the wrapper."""
        self._fuse() if not torch.is_grad_enabled() else None
        self._pass_handles = [self._hosts[0].register_forward_hook(self._embed_hook)]
        for key, linear in self._linears.items():
            own = linear.__dict__.get("forward")
            linear.forward = partial(self._delta_forward, key, linear.forward)
            self._wrapped.append((linear, own))

    def _end_pass(self) -> None:
        for handle in self._pass_handles:
            handle.remove()
        for linear, own in self._wrapped:
            if own is None:
                del linear.forward
            else:
                linear.forward = own
        self._pass_handles, self._wrapped = [], []
        self._pass_cache = {}
        self._rows = self._slots = self._row_mask = self._row_scale = self._run = None

    def _fuse(self) -> None:
        """Concatenated A and block-diagonal B per shared-input group, rebuilt when any
        parameter changed (in place or replaced)."""
        params = list(self.deltas.parameters())
        version = tuple((p.data_ptr(), p._version) for p in params)
        if self._fused is not None and self._fused[0] == version:
            return
        groups: dict[str, list[str]] = {}
        for key, group in self._group_of.items():
            groups.setdefault(group, []).append(key)
        fused = {}
        with torch.no_grad():
            for group, keys in groups.items():
                deltas = [self.deltas[k] for k in keys]
                scaled = [d.b.float() * d.scale for d in deltas]
                fused[group] = (torch.cat([d.a.float() for d in deltas]), torch.block_diag(*scaled))
                start = 0
                for key, d in zip(keys, deltas):
                    self._slice_of[key] = slice(start, start + d.b.shape[0])
                    start += d.b.shape[0]
        self._fused = (version, fused)

    def _find_sat_rows(self, module, args, kwargs):
        self._end_pass()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return None
        lookup = self._lookup.to(ids.device)
        slots = torch.where(ids < lookup.numel(), lookup[ids.clamp(max=lookup.numel() - 1)], -1)  # [B, T]
        rows = (slots.reshape(-1) >= 0).nonzero().squeeze(1)  # [n]; one host sync per pass
        if rows.numel():
            self._rows, self._slots = rows, slots.reshape(-1)[rows]
            first, last = int(rows[0]), int(rows[-1])
            self._run = slice(first, last + 1) if last - first + 1 == rows.numel() else None
            if torch.is_grad_enabled():  # training's masked products; decoding indexes the rows
                self._row_mask = (slots >= 0)[..., None]  # [B, T, 1]; cast once per pass by the embedding hook
            self._begin_pass()
        return None

    def _embed_hook(self, module, args, output):
        flat = output.reshape(-1, output.shape[-1])
        flat = flat.index_copy(0, self._rows, self.sat_embed[self._slots].to(flat.dtype))
        if self._row_mask is not None:  # [B, T, 1]: scale at SAT rows, 0 elsewhere, in the activations' dtype
            self._row_scale = self._row_mask.to(output.dtype) * (self.cfg.alpha / self.cfg.rank)
        return flat.view_as(output)

    def _delta_forward(self, key: str, inner, x: torch.Tensor) -> torch.Tensor:
        """The layer's own output plus its low-rank delta at the SAT rows."""
        out = inner(x)
        if torch.is_grad_enabled():  # training: one product pair per layer, autograd through it
            delta = self.deltas[key]
            low = F.linear(F.linear(x.float(), delta.a.float()), delta.b.float())
            return torch.addcmul(out, low.to(out.dtype), self._row_scale)
        # Inference: fp32 (several times cheaper than bf16 for a few rows on CPU), on the SAT
        # rows alone, fused per shared-input group, the scale folded into B. The SAT rows are a
        # pass's draft blocks: one run of rows at batch 1 (a slice, no index ops), else
        # gathered (at batch 16 they are under half the pass's rows).
        group = self._group_of[key]
        cached = self._pass_cache.get(group)
        if cached is None or cached[0] is not x:
            a, b = self._fused[1][group]
            flat = x.reshape(-1, x.shape[-1])
            rows = flat[self._run] if self._run is not None else flat.index_select(0, self._rows)
            cached = (x, F.linear(F.linear(rows.float(), a), b))
            self._pass_cache[group] = cached
        low = cached[1]
        part = self._slice_of[key]
        if part.stop - part.start != low.shape[-1]:
            low = low[:, part]
        flat = out.reshape(-1, out.shape[-1])
        if self._run is not None:
            flat[self._run].add_(low.to(out.dtype))
            return flat.view_as(out)
        return flat.index_add_(0, self._rows, low.to(out.dtype)).view_as(out)

    # --- storage ---
    def save(self, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / WEIGHTS_FILE
        tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in self.named_parameters()}
        save_file(tensors, str(path), metadata={"sat_ids": ",".join(map(str, self.sat_ids))})
        return path

    def load_weights(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(directory) / WEIGHTS_FILE
        tensors = load_file(str(path))
        own = dict(self.named_parameters())
        if set(tensors) != set(own):
            missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise ValueError(f"{path} does not fit this model's adapter (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(tensors[name].to(p.dtype))


def attach_adapter(model: torch.nn.Module, sat_ids: list[int], cfg: AdapterConfig) -> SATAdapter:
    """Create an adapter (fp32, on the model's device), register its hooks, and make it a
    submodule of the model (so optimizers, DDP and checkpoints see its parameters).

    Its parameters stay fp32 whatever the model's dtype: a rank-r product over the few rows
    of a draft pass costs several times less in fp32 than in bf16 on CPU (it is ~1% of the
    model's parameters)."""
    if get_adapter(model) is not None:
        raise ValueError("the model already has a SAT adapter")
    adapter = SATAdapter(model, sat_ids, cfg).to(next(model.parameters()).device, torch.float32)
    adapter.attach()
    setattr(model, ATTR, adapter)
    return adapter


def get_adapter(model: torch.nn.Module) -> SATAdapter | None:
    return getattr(model, ATTR, None)


def has_adapter_file(directory: str | Path) -> bool:
    return (Path(directory) / WEIGHTS_FILE).exists()
