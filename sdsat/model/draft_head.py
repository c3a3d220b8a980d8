"""A draft-coherence head: SAT i's guess conditioned on the token just before it.

A SAT at offset i sees the prefix up to ``last`` only: SAT 1 guesses the token two steps
ahead without knowing the next one, which the same pass computes exactly (the argmax at
``last``). The head closes that gap. After a pass, the guesses are made one after another:

    g_1 = argmax lm_head(h_1 + mlp([h_1, embed(y), f]))        y: the token before SAT 1's target
    g_i = argmax lm_head(h_i + mlp([h_i, embed(g_{i-1}), f]))

where h_i is SAT i's final hidden state (the LM head's input), f the final hidden state at
the block's anchor ``last`` (the base model's own, the one whose argmax gave y when nothing
was accepted: EAGLE's input pair of feature and next token) and y the token just before the
first guess's target. The k drafts are then one consistent continuation, not k independent guesses (as in
Hydra's sequential heads and the sampler head of "Your LLM Knows the Future").

The head only changes which drafts are proposed; verification decides what is emitted, so
the output stays exactly the model's greedy output. Its second layer starts at zero: a fresh
head guesses exactly what the SATs alone guess. Parameters are fp32 (a few small products per
pass); the LM head runs in the model's dtype.

Stored as ``sdsat_head.safetensors`` beside the SAT adapter; its shape lives in
``SATConfig.head``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

WEIGHTS_FILE = "sdsat_head.safetensors"
ATTR = "sdsat_head"  # the head's attribute on the model it is attached to


@dataclass
class HeadConfig:
    width: int = 1024  # hidden width of the head's MLP

    def __post_init__(self):
        if self.width < 1:
            raise ValueError(f"draft head width must be >= 1, got {self.width}")

    def to_dict(self) -> dict:
        return asdict(self)


class DraftHead(torch.nn.Module):
    """h, prev, anchor -> h + fc2(silu(fc1([h, embed(prev), anchor]))), read out by the model's LM head."""

    def __init__(self, model: torch.nn.Module, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        size = model.config.hidden_size
        self.fc1 = torch.nn.Linear(3 * size, cfg.width)
        self.fc2 = torch.nn.Linear(cfg.width, size)
        torch.nn.init.zeros_(self.fc2.weight)
        torch.nn.init.zeros_(self.fc2.bias)
        # A tuple: the model's own modules are not registered as the head's submodules.
        self._hosts = (model.get_input_embeddings(), model.get_output_embeddings())
        self.hidden: torch.Tensor | None = None  # the LM head's input in the latest pass [B, q, H]
        self._handle = None

    def attach(self) -> None:
        """Record the LM head's input on every pass (a reference, no copy)."""
        self._handle = self._hosts[1].register_forward_pre_hook(self._capture)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self.hidden = None, None

    def _capture(self, module, args):
        self.hidden = args[0]

    def adjust(self, hidden: torch.Tensor, prev: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """[N, H] SAT hidden states, [N] previous tokens, [N, H] anchor hidden states -> [N, H]
        adjusted hidden states (fp32)."""
        return self._step(*self._prepare(hidden, anchor), prev)

    def _prepare(self, hidden: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts of a guess that do not depend on the previous token, for [..., H] hidden
        states and their anchors [..., H] (or [N, H] anchors of [N, n, H] hidden states):
        (fc1's h and f terms with its bias [..., W], h plus fc2's bias [..., H]). fc1 over
        [h, e, f] is the sum of its three column blocks' products, so a chain of guesses computes
        the h and f terms once instead of once a step."""
        size = hidden.shape[-1]
        h = hidden.float()
        w = self.fc1.weight
        feature = F.linear(anchor.float(), w[:, 2 * size :], self.fc1.bias)
        if feature.dim() < h.dim():
            feature = feature.unsqueeze(-2)
        return F.linear(h, w[:, :size]) + feature, h + self.fc2.bias

    def _step(self, base: torch.Tensor, residual: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """One guess's adjusted hidden state [N, H] (fp32) from :meth:`_prepare`'s parts [N, W],
        [N, H] and the previous tokens [N]."""
        size = residual.shape[-1]
        e = self._hosts[0](prev).float()
        inner = F.silu(torch.addmm(base, e, self.fc1.weight[:, size : 2 * size].t()))
        return torch.addmm(residual, inner, self.fc2.weight.t())

    def logits(
        self, hidden: torch.Tensor, prev: torch.Tensor, anchor: torch.Tensor, candidates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[N, V] logits of the adjusted hidden states, through the model's LM head (not its hooks);
        with candidates [N, M] (token ids), [N, M]: the logits of those tokens only, in fp32 (a
        product with M rows of the LM head is cheaper in fp32 than in bf16 on a CPU)."""
        lm = self._hosts[1]
        adjusted = self.adjust(hidden, prev, anchor)
        bias = getattr(lm, "bias", None)
        if candidates is None:
            return F.linear(adjusted.to(lm.weight.dtype), lm.weight, bias)
        out = torch.bmm(_rows(lm.weight, candidates), adjusted[:, :, None])[:, :, 0]  # [N, M]
        return out if bias is None else out + bias[candidates].float()

    def chain(self, *args, **kwargs) -> list[list[int]]:
        """:meth:`guess`'s greedy guesses alone, per row."""
        return self.guess(*args, **kwargs)[0]

    @torch.no_grad()
    def guess(
        self,
        hidden: torch.Tensor,
        first: torch.Tensor,
        anchor: torch.Tensor,
        counts: list[int],
        banned: torch.Tensor | None,
        candidates: torch.Tensor | None = None,
        siblings: int = 0,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Greedy guesses made one after another, and per row the head's next ``siblings`` best
        guesses for its first draft (rank 1 onwards: what a draft tree would verify beside it;
        none for a row that makes no guess). hidden [R, n, H]: each row's SAT hidden states
        from its first guessing position; first [R]: the token before row r's first guess;
        anchor [R, H]: the hidden state at row r's block anchor; counts[r] <= n: how many
        guesses row r makes. candidates [R, n, M]: the tokens each guess chooses among (the
        SAT's own top M, :func:`top_candidates`; None: the whole vocabulary).

        Every row takes every step (a row's guesses past its count are dropped), so a step is
        a few batched products: the parts that do not depend on the previous token, the LM
        head's candidate rows and the banned candidates are computed once for the chain. One
        host sync at the end."""
        steps = max(counts, default=0)
        if not steps:
            return [[] for _ in counts], [[] for _ in counts]
        lm = self._hosts[1]
        bias = getattr(lm, "bias", None)
        base, residual = self._prepare(hidden[:, :steps], anchor)  # [R, n, W], [R, n, H]
        among = None if candidates is None else candidates[:, :steps]
        if among is not None:
            rows = _rows(lm.weight, among)  # [R, n, M, H] fp32
            row_bias = None if bias is None else bias[among].float()
            barred = None if banned is None or not banned.numel() else torch.isin(among, banned)  # [R, n, M]
        prev, out, top = first, [], None
        for step in range(steps):
            adjusted = self._step(base[:, step], residual[:, step], prev)  # [R, H] fp32
            if among is None:
                logits = _ban(F.linear(adjusted.to(lm.weight.dtype), lm.weight, bias), banned, None)
            else:
                logits = torch.bmm(rows[:, step], adjusted[:, :, None])[:, :, 0]  # [R, M]
                logits = logits if row_bias is None else logits + row_bias[:, step]
                logits = logits if barred is None else logits.masked_fill(barred[:, step], float("-inf"))
            if step == 0 and siblings:
                top = logits.topk(1 + siblings, dim=-1).indices
                top = top if among is None else among[:, 0].gather(1, top)
            prev = logits.argmax(dim=-1)
            if among is not None:
                prev = among[:, step].gather(1, prev[:, None])[:, 0]
            out.append(prev)
        tokens = torch.stack(out, dim=1).tolist()
        guesses = [row[:n] for row, n in zip(tokens, counts)]
        alternatives = [row[1:] if n else [] for row, n in zip(top.tolist(), counts)] if top is not None else [[] for _ in counts]
        return guesses, alternatives

    @torch.no_grad()
    def tree(
        self,
        hidden: torch.Tensor,
        first: torch.Tensor,
        anchor: torch.Tensor,
        parents: tuple[int, ...],
        depths: tuple[int, ...],
        ranks: tuple[int, ...],
        banned: torch.Tensor | None,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The tokens of a draft tree guessed through the head: node j (depth d, rank r) is the
        head's rank-r guess at SAT position d given its parent's token, so every branch is a
        continuation of its own ancestors, not a draw from one list per depth. hidden [B, k, H]:
        SAT hidden states; first [B]: the root's token (y0); anchor [B, H]; parents, depths,
        ranks: the tree (sdsat.decode.tree.DraftTree, nodes in order of depth); candidates
        [B, k, M]: each SAT position's own top tokens (None: the whole vocabulary).
        Returns [B, N] node tokens; the rank-0 path is :meth:`chain`'s guesses."""
        batch = first.shape[0]
        tokens = torch.empty(batch, len(parents), dtype=torch.long, device=first.device)
        tokens[:, 0] = first
        for depth in range(1, max(depths) + 1):
            nodes = [j for j, d in enumerate(depths) if d == depth]
            owners = sorted({parents[j] for j in nodes})  # parents with children at this depth
            width = max(ranks[j] for j in nodes) + 1
            n = len(owners)
            prev = tokens[:, owners].reshape(-1)  # [B*n], row-major: row b's parents together
            h = hidden[:, depth - 1].repeat_interleave(n, dim=0)
            among = None if candidates is None else candidates[:, depth - 1].repeat_interleave(n, dim=0)
            logits = _ban(self.logits(h, prev, anchor.repeat_interleave(n, dim=0), among), banned, among)
            top = logits.topk(width, dim=-1).indices
            if among is not None:
                top = among.gather(1, top)
            top = top.view(batch, n, width)
            slot = {p: i for i, p in enumerate(owners)}
            for j in nodes:
                tokens[:, j] = top[:, slot[parents[j]], ranks[j]]
        return tokens

    @torch.no_grad()
    def true_ranks(
        self,
        hidden: torch.Tensor,
        first: torch.Tensor,
        anchor: torch.Tensor,
        true: torch.Tensor,
        banned: torch.Tensor | None,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rank of each true token among the head's guesses given the true token before it
        (the rank its node needs in a :meth:`tree`): hidden [B, k, H], first [B] (the root's
        token), anchor [B, H], true [B, k], candidates [B, k, M] -> [B, k]. A true token
        outside its position's candidates gets rank M (no tree reaches it)."""
        batch, k = true.shape
        prev = torch.cat([first[:, None], true[:, :-1]], dim=1).reshape(-1)
        among = None if candidates is None else candidates.reshape(batch * k, -1)
        logits = _ban(self.logits(hidden.reshape(batch * k, -1), prev, anchor.repeat_interleave(k, dim=0), among).float(), banned, among)
        target = true.reshape(-1, 1)
        if among is None:
            ranks = (logits > logits.gather(1, target)).sum(-1)
        else:
            found = among == target
            own = logits.masked_fill(~found, float("-inf")).max(-1, keepdim=True).values
            ranks = torch.where(found.any(-1), (logits > own).sum(-1), torch.full_like(target[:, 0], among.shape[1]))
        return ranks.view(batch, k)

    # --- storage ---
    def save(self, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / WEIGHTS_FILE
        save_file({name: p.detach().to("cpu", dtype).contiguous() for name, p in self.named_parameters()}, str(path))
        return path

    def load_weights(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(directory) / WEIGHTS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{directory}: its config names a draft head but {WEIGHTS_FILE} is missing")
        tensors = load_file(str(path))
        own = dict(self.named_parameters())
        if set(tensors) != set(own) or any(tensors[n].shape != p.shape for n, p in own.items()):
            raise ValueError(f"{path} does not fit this model's draft head (width {self.cfg.width})")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(tensors[name].to(p.dtype))


def _rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The LM head's rows of these token ids [...] -> [..., H], fp32 (an index_select: several
    times cheaper than advanced indexing for a thousand rows on a CPU)."""
    return weight.index_select(0, ids.reshape(-1)).view(*ids.shape, weight.shape[-1]).float()


def _ban(logits: torch.Tensor, banned: torch.Tensor | None, among: torch.Tensor | None) -> torch.Tensor:
    """-inf at the banned tokens (the SATs): logits [N, V] over the vocabulary (among None) or
    [N, M] over the token ids ``among`` [N, M]."""
    if banned is None or not banned.numel():
        return logits
    if among is None:
        return logits.index_fill(-1, banned, float("-inf"))
    return logits.masked_fill(torch.isin(among, banned), float("-inf"))


HEAD_CANDIDATES = 256  # tokens a decoding guess chooses among: the SAT's own top 256 (jobs/head_levers.py)


def top_candidates(logits: torch.Tensor, m: int | None = None) -> torch.Tensor | None:
    """[..., V] SAT logits -> [..., m] their top-m token ids: the head re-ranks these instead of
    the whole vocabulary, so a guess costs an m-row product, not the LM head's V rows (at
    V = 49k, five guesses cost about 0.6 of a plain pass on a CPU). A draft is only a
    guess, verified before it counts, so this changes speed and acceptance, never output.
    m: HEAD_CANDIDATES when None. None (the whole vocabulary) when m is 0 or not below V."""
    m = HEAD_CANDIDATES if m is None else m
    if m <= 0 or m >= logits.shape[-1]:
        return None
    return logits.topk(m, dim=-1).indices


def attach_head(model: torch.nn.Module, cfg: HeadConfig) -> DraftHead:
    """Create a head (fp32, on the model's device), start recording the LM head's input, and
    make it a submodule of the model (optimizers, DDP and checkpoints see its parameters)."""
    if get_head(model) is not None:
        raise ValueError("the model already has a draft head")
    head = DraftHead(model, cfg).to(next(model.parameters()).device, torch.float32)
    head.attach()
    setattr(model, ATTR, head)
    return head


def get_head(model: torch.nn.Module) -> DraftHead | None:
    return getattr(model, ATTR, None)


def remove_head(model: torch.nn.Module) -> DraftHead | None:
    """Take the model's draft head off (it stops recording and leaves the submodules);
    returns it, or None where there was none. Decoding then drafts the SATs' own guesses."""
    head = get_head(model)
    if head is not None:
        head.detach()
        delattr(model, ATTR)
    return head
