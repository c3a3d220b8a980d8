"""A KV cache with per-row lengths, for batched speculative decoding.

Each row of the batch owns slots 0..capacity-1 of a preallocated buffer per layer.
``lengths[b]`` slots are committed; a forward pass of q tokens writes them at slots
lengths[b]..lengths[b]+q-1 of its row, whatever the other rows' lengths. Rolling back
rejected drafts is only a matter of not advancing ``lengths`` past them: their slots are
masked and overwritten by the next pass. No row ever waits for or pads to another.

It plugs into transformers through the public ``Cache`` interface, so the model's own
attention code runs unchanged; the caller passes position ids and the mask returned by
:meth:`SlotCache.prepare`: None where the model's own causal mask is exact (every row equally
long), so that SDPA can use its fused kernels; else a 4D mask, boolean for SDPA and additive
float for other attention kernels (eager adds the mask, so a boolean one would be wrong there).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .pass_timer import PassTimer

_GROW = 256  # capacity grows in steps of this many slots


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values: [batch, kv_heads, capacity, head_dim]."""

    def __init__(self, owner: "SlotCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states):
        batch, heads, _, dim = key_states.shape
        shape = (batch, heads, self.owner.capacity, dim)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        q = key_states.shape[2]
        if owner.uniform_length is not None:  # all rows equally long: a plain slice write
            start = owner.uniform_length
            self.keys[:, :, start : start + q] = key_states
            self.values[:, :, start : start + q] = value_states
        else:  # index_put_, not scatter_: on CPU scatter_ took ~15x longer (~0.26 ms a call at batch 16)
            index = owner.write_index(key_states.shape[1])
            self.keys.index_put_(index, key_states)
            self.values.index_put_(index, value_states)
        kv_len = owner.kv_length
        return self.keys[:, :, :kv_len], self.values[:, :, :kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_length, 0

    def get_seq_length(self) -> int:
        return max(self.owner.lengths, default=0)

    def get_max_length(self) -> int:
        return self.owner.capacity

    def grow(self, capacity: int) -> None:
        if self.is_initialized:
            pad = capacity - self.keys.shape[2]
            self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, pad))
            self.values = torch.nn.functional.pad(self.values, (0, 0, 0, pad))

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, rows)
            self.values = self.values.index_select(0, rows)


class SlotCache(Cache):
    """Per-row-length KV cache. Protocol per forward pass:

    ``mask = cache.prepare(q)``, run the model with ``position_ids=cache.position_ids(q)``
    and ``attention_mask=mask``, then ``cache.advance(counts)`` with how many of the q new
    tokens each row keeps.
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int = _GROW):
        self.lengths: list[int] = [0] * batch_size
        self.capacity = round_capacity(capacity)
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.kv_length = 0
        self.uniform_length: int | None = 0
        self.write_slots: torch.Tensor | None = None  # [B, q]
        self._write_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype = torch.float32  # of the model, for the additive mask
        self.bool_mask = False  # the model's attention takes boolean masks (SDPA)
        self.timer = PassTimer()  # time spent in passes over this cache

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int = _GROW) -> "SlotCache":
        config = model.config.get_text_config()
        cache = cls(config.num_hidden_layers, batch_size, capacity)
        param = next(model.parameters())
        cache.device = param.device
        cache.dtype = param.dtype
        cache.bool_mask = getattr(model.config, "_attn_implementation", None) == "sdpa"
        cache.timer = PassTimer(param.device)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        probe = torch.empty(batch_size, heads, 0, head_dim, dtype=param.dtype, device=param.device)
        for layer in cache.layers:
            layer.lazy_initialization(probe, probe)
        return cache

    @property
    def forward_seconds(self) -> float:
        return self.timer.seconds

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def prepare(self, q: int, dtype: torch.dtype, block_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Get ready to write q tokens per row; return the mask [B, 1, q, kv_len] (see the module
        docstring): None when every row is equally long and the block is causal, else boolean
        (True: attend) if ``bool_mask``, else additive in ``dtype``.

        block_mask: [q, q] bool, which new tokens see which (default: causal), or [B, q, q]
        for a mask per row.
        """
        needed = max(self.lengths) + q
        if needed > self.capacity:
            self.capacity = round_capacity(needed)
            for layer in self.layers:
                layer.grow(self.capacity)
        self.kv_length = needed
        first = self.lengths[0]
        self.uniform_length = first if all(n == first for n in self.lengths) else None
        if self.uniform_length is not None and block_mask is None:
            return None  # the model's own causal mask (q_offset = the common length) is this one
        lengths = torch.tensor(self.lengths, device=self.device)  # [B]
        self.write_slots = lengths[:, None] + torch.arange(q, device=self.device)  # [B, q]
        self._write_index = None
        slots = torch.arange(needed, device=self.device)  # [kv_len]
        if block_mask is None:
            block_mask = torch.ones(q, q, dtype=torch.bool, device=self.device).tril()
        # A slot below the row's length is committed past, visible to every new token.
        # Slot length + j holds new token j, visible to new token i where block_mask[i, j].
        past = slots[None, None, :] < lengths[:, None, None]  # [B, 1, kv_len]
        rel = slots[None, :] - lengths[:, None]  # [B, kv_len]
        in_block = (rel >= 0) & (rel < q)
        batch = len(self.lengths)
        per_row = block_mask.expand(batch, q, q)  # one mask for every row, or [B, q, q] already
        sees = per_row.gather(2, rel.clamp(0, q - 1)[:, None, :].expand(-1, q, -1))  # [B, q, kv_len]
        allowed = past | (sees & in_block[:, None, :])  # [B, q, kv_len]
        if self.bool_mask:
            return allowed[:, None]
        mask = torch.zeros((batch, q, needed), dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def write_index(self, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, head, slot) indices [B, heads, q] of this pass's writes, made once per pass."""
        if self._write_index is None or self._write_index[0].shape[1] != heads:
            self._write_index = _slot_index(self.write_slots, heads)
        return self._write_index

    def position_ids(self, q: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Positions of the q new tokens per row: length + j (or length + offsets[j])."""
        if offsets is None:
            offsets = torch.arange(q, device=self.device)
        return torch.tensor(self.lengths, device=self.device)[:, None] + offsets

    def advance(self, counts: list[int] | int) -> None:
        """Commit the first counts[b] tokens written by the last pass in row b."""
        if isinstance(counts, int):
            counts = [counts] * self.batch_size
        self.lengths = [n + c for n, c in zip(self.lengths, counts)]

    def keep_slots(self, offsets: list[list[int]]) -> None:
        """Commit, per row b, the tokens the last pass wrote at offsets[b] (past the row's
        length, in order), moving them to offsets 0..len(offsets[b])-1 (tree verification).

        A row whose offsets are already 0..m-1 only advances; so does a whole chain.
        """
        counts = [len(o) for o in offsets]
        if any(o != list(range(len(o))) for o in offsets):
            width = max(counts)
            pad = [o + list(range(len(o), width)) for o in offsets]  # pads copy a slot onto itself
            lengths = torch.tensor(self.lengths, device=self.device)[:, None]  # [B, 1]
            src = lengths + torch.tensor(pad, device=self.device)  # [B, m]
            dst = lengths + torch.arange(width, device=self.device)  # [B, m]
            heads = None
            for layer in self.layers:
                if heads != layer.keys.shape[1]:
                    heads = layer.keys.shape[1]
                    read, write = _slot_index(src, heads), _slot_index(dst, heads)
                keys, values = layer.keys[read], layer.values[read]  # read all first
                layer.keys.index_put_(write, keys)
                layer.values.index_put_(write, values)
        self.advance(counts)

    def select_rows(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for layer in self.layers:
            layer.select_rows(index)
        self.lengths = [self.lengths[r] for r in rows]

    def extend(self, other: "SlotCache") -> None:
        """Append the rows of another cache of the same model after this one's rows."""
        if other.batch_size == 0:
            return
        capacity = max(self.capacity, other.capacity)
        for cache in (self, other):
            if cache.capacity < capacity:
                cache.capacity = capacity
                for layer in cache.layers:
                    layer.grow(capacity)
        for mine, theirs in zip(self.layers, other.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.lengths = self.lengths + other.lengths

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths, default=0)


def _slot_index(slots: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, head, slot) indices [B, heads, m] that address slots [B, m] of every head, for
    advanced indexing and ``index_put_`` of a [B, heads, capacity, dim] buffer."""
    batch, m = slots.shape
    rows = torch.arange(batch, device=slots.device)[:, None, None].expand(batch, heads, m)
    head = torch.arange(heads, device=slots.device)[None, :, None].expand(batch, heads, m)
    return rows, head, slots[:, None, :].expand(batch, heads, m)


def round_capacity(n: int) -> int:
    """The capacity a cache grows to for n slots: a multiple of the growth step."""
    return max(_GROW, -(-n // _GROW) * _GROW)
