"""How many requests the KV cache has room for: admission control by memory.

Every row of a batch keeps keys and values for each layer (``SlotCache``); the rows of a
cache share one capacity, the longest row's. A request is admitted only while the rows
already running, each counted at its worst case (prompt + max_new_tokens + the widest pass
beyond it), plus the new one fit the budget. On a GPU the budget defaults to a fraction of
the memory still free once the model is loaded; on a CPU there is none unless configured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..decode.kv_cache import round_capacity

GPU_FRACTION = 0.9  # of the free accelerator memory, when no budget is configured


@dataclass(frozen=True)
class KVBudget:
    bytes_per_token: int  # keys and values of every layer for one token of one row
    budget_bytes: int | None  # None: no limit
    room: int  # tokens a pass may write past a row's committed length (its widest pass)

    @classmethod
    def for_model(cls, model, budget_bytes: int | None = None, room: int = 1) -> "KVBudget":
        """The budget for this model: ``budget_bytes`` if given, else GPU_FRACTION of the free
        memory of the model's CUDA device (measured now: call after loading), else no limit."""
        config = model.config.get_text_config()
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        param = next(model.parameters())
        per_token = 2 * config.num_hidden_layers * heads * head_dim * param.element_size()
        if budget_bytes is None and param.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(param.device)
            budget_bytes = int(free * GPU_FRACTION)
        return cls(per_token, budget_bytes, room)

    def row_tokens(self, prompt_len: int, max_new_tokens: int) -> int:
        """Cache slots a request may need at its longest."""
        return prompt_len + max_new_tokens + self.room

    def bytes_for(self, rows: list[int]) -> int:
        """Bytes of one cache holding rows of these lengths (tokens): they share the longest's capacity."""
        return len(rows) * round_capacity(max(rows, default=0)) * self.bytes_per_token if rows else 0

    def fits(self, running: list[int], new: int) -> bool:
        """Whether a row needing ``new`` tokens fits beside rows needing ``running``."""
        return self.budget_bytes is None or self.bytes_for([*running, new]) <= self.budget_bytes

    def check_alone(self, tokens: int) -> None:
        """Raise ValueError if a request needing ``tokens`` slots cannot fit even alone."""
        if not self.fits([], tokens):
            need, have = self.bytes_for([tokens]) / 2**30, self.budget_bytes / 2**30
            raise ValueError(
                f"the request needs {tokens} KV-cache slots ({need:.2f} GB) but this replica's KV budget is "
                f"{have:.2f} GB: shorten the prompt or max_tokens"
            )
