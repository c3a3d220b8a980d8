"""Semantic adaptive tokens (SATs): adding them to a model and storing their configuration.

A SAT is an added vocabulary token. Placed after a real prefix, SAT number i (1-based) is
trained to predict the token i+1 steps ahead. SATs never change the architecture: they are
new rows of the input embedding (and of a tied LM head).

Two layouts:
- distinct ids (default): ``<sat_1> .. <sat_k>``, one token per offset;
- repeated: one token ``<sat>`` used k times (what the paper's released models do);
  the offset is then told apart only by the position.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CONFIG_FILE = "sdsat_config.json"
FORMAT_VERSION = 1


@dataclass
class SATConfig:
    """What a checkpoint knows about its SATs."""

    sat_ids: list[int]  # [k]: token id used at draft offset i (1-based i -> sat_ids[i-1])
    sat_tokens: list[str]  # [k]: their strings
    num_sat_trained: int = 0  # k the SATs were trained for; 0 = untrained
    base_model: str = ""
    repeated: bool = False
    recipe: dict = field(default_factory=dict)
    adapter: dict = field(default_factory=dict)  # AdapterConfig fields; empty: no SAT adapter
    head: dict = field(default_factory=dict)  # HeadConfig fields; empty: no draft head
    format_version: int = FORMAT_VERSION

    @property
    def num_sat(self) -> int:
        return len(self.sat_ids)

    @property
    def unique_ids(self) -> list[int]:
        return sorted(set(self.sat_ids))

    def ids_for(self, k: int) -> list[int]:
        """The SAT ids of a draft block of length k; refuses k beyond what the model has."""
        if not 0 <= k <= self.num_sat:
            raise ValueError(f"num_sat={k} is out of range: this model has {self.num_sat} SATs (0..{self.num_sat})")
        return self.sat_ids[:k]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "SATConfig | None":
        """The SAT config stored in a checkpoint directory, or None if it has none."""
        path = Path(directory) / CONFIG_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} has format_version {data['format_version']}; this sdsat reads <= {FORMAT_VERSION}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def sat_token_strings(k: int, repeated: bool) -> list[str]:
    return ["<sat>"] * k if repeated else [f"<sat_{i}>" for i in range(1, k + 1)]


def add_sat_tokens(
    model,
    tokenizer,
    k: int,
    *,
    repeated: bool = False,
    init: str = "mean",
    noise_std: float = 0.02,
    seed: int = 0,
    base_model: str = "",
) -> SATConfig:
    """Add k SATs to ``tokenizer`` and ``model`` in place and return their configuration.

    init: "mean" (mean of the existing embedding rows) or a token string whose row is copied.
    Each new row gets Gaussian noise of ``noise_std`` times the embedding's row std, so the
    k rows differ. Existing rows (and so old-vocabulary logits) are unchanged.
    """
    if k < 1:
        raise ValueError(f"num_sat must be >= 1, got {k}")
    strings = sat_token_strings(k, repeated)
    unique = list(dict.fromkeys(strings))
    present = [s for s in unique if s in tokenizer.get_vocab()]
    if present:
        raise ValueError(f"tokenizer already has SAT tokens {present}; load its SATConfig instead of adding again")
    tokenizer.add_special_tokens({"additional_special_tokens": unique}, replace_extra_special_tokens=False)
    ids = [tokenizer.convert_tokens_to_ids(s) for s in strings]

    embed = model.get_input_embeddings()
    old_rows = embed.weight.shape[0]
    if init == "mean":
        source = embed.weight.data.float().mean(dim=0)
    else:
        src_id = tokenizer.get_vocab().get(init)
        if src_id is None:
            raise ValueError(f"init token {init!r} is not in the tokenizer's vocabulary")
        source = embed.weight.data[src_id].float()
    row_std = embed.weight.data.float().std(dim=1).mean()
    needed = max(max(ids) + 1, old_rows)
    if needed > old_rows:
        model.resize_token_embeddings(needed, mean_resizing=False)
    embed = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sat_id in sorted(set(ids)):
            noise = torch.randn(source.shape, generator=gen) * noise_std * row_std
            embed.weight[sat_id] = (source + noise).to(embed.weight.dtype)
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != embed.weight.data_ptr():
            # An untied LM head: new output rows start at the mean output row (their logits are
            # masked during decoding anyway; SATs are never emitted).
            mean_out = head.weight.data[:old_rows].float().mean(dim=0)
            for sat_id in sorted(set(ids)):
                head.weight[sat_id] = mean_out.to(head.weight.dtype)
    return SATConfig(sat_ids=ids, sat_tokens=strings, num_sat_trained=0, base_model=base_model, repeated=repeated)
