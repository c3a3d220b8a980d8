"""A SAT-position adapter: low-rank deltas that act only where the input token is a SAT.

The base model stays frozen. Its decoder gets a forward pre-hook that records which
rows (flattened batch x sequence positions) of ``input_ids`` hold SAT ids; every adapted
linear layer then adds ``scale * B(A(x))`` at those rows only, and the input embedding's
output at those rows is replaced by the adapter's own SAT embedding rows.

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
        self._fused: tuple | None = None  # (parameter versions, {group: (A [sum r, d_in], B [sum d_out, sum r])})
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
        self._slots: torch.Tensor | None = None  # [n] index into sat_embed of each such row
        self._row_mask: torch.Tensor | None = None  # [B, T, 1] bool: SAT positions
        self._row_scale: torch.Tensor | None = None  # [B, T, 1]: alpha / rank at SAT positions, else 0
        self._handles: list = []
        self._pass_handles: list = []

    # --- hooks ---
    def attach(self) -> None:
        """Register the decoder hooks. The per-layer hooks exist only during a pass that holds
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
        self._fuse() if not torch.is_grad_enabled() else None
        self._pass_handles = [self._hosts[0].register_forward_hook(self._embed_hook)]
        for key, linear in self._linears.items():
            self._pass_handles.append(linear.register_forward_hook(self._delta_hook(key)))

    def _end_pass(self) -> None:
        for handle in self._pass_handles:
            handle.remove()
        self._pass_handles = []
        self._pass_cache = {}
        self._rows = self._slots = self._row_mask = self._row_scale = None

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
                fused[group] = (torch.cat([d.a.float() for d in deltas]), torch.block_diag(*[d.b.float() for d in deltas]))
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
            self._row_mask = (slots >= 0)[..., None]  # [B, T, 1]; cast once per pass by the embedding hook
            self._begin_pass()
        return None

    def _embed_hook(self, module, args, output):
        flat = output.reshape(-1, output.shape[-1])
        flat = flat.index_copy(0, self._rows, self.sat_embed[self._slots].to(flat.dtype))
        # [B, T, 1]: scale at SAT rows, 0 elsewhere, in the activations' dtype
        self._row_scale = self._row_mask.to(output.dtype) * (self.cfg.alpha / self.cfg.rank)
        return flat.view_as(output)

    def _delta_hook(self, key: str):
        # Dense: the rank-r delta on every row of the pass, masked to the SAT rows. A pass
        # holds SATs only in training's SAT pass and in decoding's draft pass (k + 1 rows
        # per sequence), where most rows are SATs.
        delta, group = self.deltas[key], self._group_of[key]

        def hook(module, args, output):
            x = args[0]
            if torch.is_grad_enabled():  # training: one product pair per layer, autograd through it
                low = F.linear(F.linear(x.float(), delta.a.float()), delta.b.float())
            else:  # inference: fp32 (several times cheaper than bf16 for a few rows on CPU), fused per group
                cached = self._pass_cache.get(group)
                if cached is None or cached[0] is not x:
                    a, b = self._fused[1][group]
                    cached = (x, F.linear(F.linear(x.float(), a), b))
                    self._pass_cache[group] = cached
                low = cached[1][..., self._slice_of[key]]
            return torch.addcmul(output, low.to(output.dtype), self._row_scale)

        return hook

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
