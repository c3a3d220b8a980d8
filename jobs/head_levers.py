"""Draft-head levers, measured on cached features: what each one moves per-offset accuracy.

    python jobs/head_levers.py --distilled ROWS.json --json results/head_levers.json
    python jobs/head_levers.py --distilled ROWS.json --val-file BENCH_ROWS.json --extra GENRE_ROWS.json \
        --levers "base,+ extra rows,extra in place" --json results/head_levers_genres.json

BENCH_ROWS.json and GENRE_ROWS.json come from jobs/distill_rows.py (the benchmark prompts'
continuations; configs/data/genre_prompts.json's). The second run asks whether rows in other
genres move acceptance on prompts none of the rows came from.

ROWS.json: the rows the head recipe distils, written by
``python jobs/finetune.py --config configs/finetune_head.yaml --distill-cache ROWS.json``
(about 20 minutes on a 2-core CPU; the run may be stopped once the file exists).

Training a head through jobs/finetune.py runs the whole model on every step (~6 s a step on a
2-core CPU). A head only reads what the frozen model gives it, so this job runs the model
once: it builds training rows (sdsat/training/rows.py) from self-distilled rows (the
``distill_cache`` file jobs/finetune.py writes, e.g. with configs/finetune_head.yaml), passes
them through the model with its SAT adapter, and keeps per SAT position the head's inputs
(SAT hidden state h, anchor hidden state f, the token before the target) and the teacher
(the base model's argmax and top-32 logits at t+i). Then it trains fresh heads on that cache,
one per lever, and reports teacher-forced accuracy per offset on held-out rows (the last
``--val-rows`` rows; the model's own artifact head may have seen them, fresh heads never do):
over the whole vocabulary and among the SAT's own top-M tokens, as decoding chooses
(sdsat/model/draft_head.py: top_candidates). Offset 1 is exactly the first draft's acceptance
on these rows; later offsets condition on the true previous token, an upper bound on the
chained guesses.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from jobs.report import machine_info, write_json

# name -> settings over BASE; each changes one thing
BASE = {"width": 1024, "depth": 1, "epochs": 1.0, "rows": None, "ce": 1.0, "kl": 0.0, "inputs": "hef", "lr": 1e-3, "extra": None}
LEVERS = {
    "base": {},
    "kl": {"ce": 0.0, "kl": 1.0},
    "width 4096": {"width": 4096},
    "depth 2": {"depth": 2},
    "no anchor feature": {"inputs": "he"},
    "rows/4": {"rows": 0.25, "epochs": 4.0},
    "rows/2": {"rows": 0.5, "epochs": 2.0},
    "3 epochs": {"epochs": 3.0},
    # with --extra ROWS.json (rows of other genres): added to the training rows, or in place of
    # as many of them (the same number of rows, so only the genres change)
    "+ extra rows": {"extra": "add"},
    "extra in place": {"extra": "swap"},
}
NEEDS_EXTRA = ("+ extra rows", "extra in place")
CANDIDATES = (64, 256, 1024)
BATCH = 256


def extract(loaded, rows: list[list[int]], num_sat: int, seed: int) -> dict[str, torch.Tensor]:
    """Per labelled SAT position of each row's training layout: h, f, prev, teacher argmax,
    teacher top-32 (ids, logits), offset, the SAT's own argmax and the row's index."""
    from sdsat.training.loss import _teacher_index
    from sdsat.training.rows import IGNORE, RowConfig, build_row, collate

    model, sat_ids = loaded.model, loaded.sat.ids_for(num_sat)
    rng, cfg = random.Random(seed), RowConfig(num_sat=num_sat, poisson_lambda=64, max_blocks=128)
    out: dict[str, list] = {k: [] for k in ("h", "f", "prev", "teach", "off", "sat", "tk_ids", "tk_val", "row")}
    start = time.perf_counter()
    for n, tokens in enumerate(rows):
        batch = collate([build_row(tokens, sat_ids, cfg, rng)], loaded.tokenizer.pad_token_id, model.dtype)
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                         attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
            labelled = batch["labels"] != IGNORE
            sat, std = labelled & (batch["sat_offset"] > 0), labelled & (batch["sat_offset"] == 0)
            teacher = _masked(model.lm_head(hidden[std]).float(), loaded)[_teacher_index(batch)]
            h = hidden[sat]
            pos, off = batch["position_ids"][sat], batch["sat_offset"][sat]
            top_val, top_ids = teacher.topk(32, -1)
        for key, value in (("h", h), ("f", hidden[0, pos - off]), ("prev", batch["input_ids"][0, pos]),
                           ("teach", teacher.argmax(-1)), ("off", off),
                           ("sat", _masked(model.lm_head(h).float(), loaded).argmax(-1)),
                           ("tk_ids", top_ids.int()), ("tk_val", top_val.half()), ("row", torch.full_like(off, n))):
            out[key].append(value)
        if n % 50 == 0 or n == len(rows) - 1:
            print(f"features: {n + 1}/{len(rows)} rows, {time.perf_counter() - start:.0f} s", flush=True)
    return {k: torch.cat(v) for k, v in out.items()}


def _masked(logits: torch.Tensor, loaded) -> torch.Tensor:
    logits[:, loaded.sat.unique_ids] = torch.finfo(logits.dtype).min
    return logits


class Head(torch.nn.Module):
    """The draft head's shape (sdsat/model/draft_head.py), with depth and inputs as levers."""

    def __init__(self, hidden: int, width: int, depth: int, inputs: str, embed: torch.Tensor):
        super().__init__()
        dims = [len(inputs) * hidden] + [width] * depth
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = torch.nn.Linear(width, hidden)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)
        self.inputs, self.embed = inputs, embed

    def forward(self, h, prev, f):
        parts = {"h": h, "e": self.embed[prev], "f": f}
        x = torch.cat([parts[c] for c in self.inputs], -1)
        for layer in self.layers:
            x = F.silu(layer(x))
        return h + self.out(x)


def accuracy(head, lm: torch.Tensor, banned: list[int], val: dict, num_sat: int) -> dict:
    out = {"full": [], **{f"top{m}": [] for m in CANDIDATES}, "sat": []}
    with torch.no_grad():
        for i in range(1, num_sat + 1):
            sel = val["off"] == i
            h, target = val["h"][sel].float(), val["teach"][sel]
            logits = (head(h, val["prev"][sel], val["f"][sel].float()).to(lm.dtype) @ lm.T).float()
            logits[:, banned] = float("-inf")
            out["full"].append((logits.argmax(-1) == target).float().mean().item())
            own = (h.to(lm.dtype) @ lm.T).float()
            own[:, banned] = float("-inf")
            for m in CANDIDATES:
                cand = own.topk(min(m, own.shape[-1]), -1).indices
                guess = cand.gather(1, logits.gather(1, cand).argmax(-1, keepdim=True))[:, 0]
                out[f"top{m}"].append((guess == target).float().mean().item())
            out["sat"].append((val["sat"][sel] == target).float().mean().item())
    return {k: [round(a, 4) for a in v] for k, v in out.items()}


def training_set(settings: dict, data: dict) -> dict[str, torch.Tensor]:
    """The SAT positions a lever trains on: the first ``rows`` fraction of the training rows,
    and with ``extra`` the extra rows added ("add") or in place of as many of the last
    training rows ("swap"). Extra rows keep their own ``row`` numbers under ``"source"`` 1."""
    train_set = dict(data["train"], source=torch.zeros_like(data["train"]["row"]))
    if settings["rows"] is not None:
        keep = train_set["row"] < int(settings["rows"] * (int(train_set["row"].max()) + 1))
        train_set = {k: v[keep] for k, v in train_set.items()}
    if settings["extra"]:
        extra = dict(data["extra"], source=torch.ones_like(data["extra"]["row"]))
        if settings["extra"] == "swap":
            keep = train_set["row"] <= int(train_set["row"].max()) - (int(extra["row"].max()) + 1)
            train_set = {k: v[keep] for k, v in train_set.items()}
        train_set = {k: torch.cat([train_set[k], extra[k]]) for k in train_set}
    return train_set


def train(settings: dict, data: dict, lm: torch.Tensor, embed: torch.Tensor, banned: list[int], seed: int) -> Head:
    torch.manual_seed(seed)
    train_set = training_set(settings, data)
    head = Head(lm.shape[1], settings["width"], settings["depth"], settings["inputs"], embed)
    opt = torch.optim.AdamW(head.parameters(), lr=settings["lr"], weight_decay=0.0)
    n = train_set["h"].shape[0]
    steps = max(1, int(settings["epochs"] * n / BATCH))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / steps))
    step = 0
    while step < steps:
        order = torch.randperm(n)
        for start in range(0, max(n - BATCH, 0) + 1, BATCH):
            j = order[start : start + BATCH]
            logits = (head(train_set["h"][j].float(), train_set["prev"][j], train_set["f"][j].float()).to(lm.dtype) @ lm.T).float()
            logits[:, banned] = torch.finfo(torch.float32).min
            loss = settings["ce"] * F.cross_entropy(logits, train_set["teach"][j]) if settings["ce"] else 0.0
            if settings["kl"]:  # cross-entropy to the teacher's top-32 distribution (KL up to a constant)
                p = F.softmax(train_set["tk_val"][j].float(), -1)
                loss = loss - settings["kl"] * (p * F.log_softmax(logits, -1).gather(1, train_set["tk_ids"][j].long())).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    return head


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distilled", required=True, help="self-distilled rows: a JSON list of token-id lists (finetune's distill_cache)")
    p.add_argument("--model", default="default", help="a model with SATs (its adapter shapes the features)")
    p.add_argument("--num-sat", type=int, default=5)
    p.add_argument("--train-rows", type=int, default=704)
    p.add_argument("--val-rows", type=int, default=64, help="the last rows of the file, never trained on")
    p.add_argument("--val-file", default="", help="held-out rows from this file instead (all of it), e.g. the benchmark prompts' continuations")
    p.add_argument("--extra", default="", help="rows of other genres for the levers '+ extra rows' and 'extra in place'")
    p.add_argument("--features", default="", help="cache file: read when it exists, else written")
    p.add_argument("--levers", default="", help=f"comma-separated, of: {', '.join(LEVERS)} (default: all; the extra-row ones with --extra)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    names = args.levers.split(",") if args.levers else [n for n in LEVERS if args.extra or n not in NEEDS_EXTRA]
    unknown = [name for name in names if name not in LEVERS]
    if unknown:
        raise SystemExit(f"--levers: unknown {unknown}; choose from {list(LEVERS)}")
    if not args.extra and set(names) & set(NEEDS_EXTRA):
        raise SystemExit(f"--levers {sorted(set(names) & set(NEEDS_EXTRA))} need --extra ROWS.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    from sdsat.model.load import load_model

    loaded = load_model(args.model, dtype="bfloat16")
    rows = json.loads(Path(args.distilled).read_text())
    held_out = json.loads(Path(args.val_file).read_text()) if args.val_file else None
    needed = args.train_rows + (0 if held_out else args.val_rows)
    if len(rows) < needed:
        raise SystemExit(f"--distilled has {len(rows)} rows, fewer than the {needed} asked for")
    cache = Path(args.features) if args.features else None
    if cache is not None and cache.exists():
        data = torch.load(cache)
    else:
        data = {"val": extract(loaded, held_out or rows[-args.val_rows:], args.num_sat, 1),
                "train": extract(loaded, rows[: args.train_rows], args.num_sat, 0)}
        if args.extra:
            data["extra"] = extract(loaded, json.loads(Path(args.extra).read_text()), args.num_sat, 2)
        if cache is not None:
            torch.save(data, cache)
    lm = loaded.model.lm_head.weight.detach()
    embed = loaded.model.get_input_embeddings().weight.detach().float()
    banned = loaded.sat.unique_ids
    result = {"levers": {}, "base_settings": BASE, "samples": int(data["train"]["h"].shape[0]),
              "train_rows": args.train_rows, "val_rows": len(held_out) if held_out else args.val_rows, "model": args.model,
              "k": args.num_sat, "distilled": Path(args.distilled).name, "machine": machine_info(),
              "val_file": Path(args.val_file).name if args.val_file else None, "extra": Path(args.extra).name if args.extra else None,
              "extra_rows": int(data["extra"]["row"].max()) + 1 if "extra" in data else 0}
    for name in names:
        settings = BASE | LEVERS[name]
        start = time.perf_counter()
        head = train(settings, data, lm, embed, banned, seed=0)
        acc = accuracy(head, lm, banned, data["val"], args.num_sat)
        result["levers"][name] = {"settings": LEVERS[name], **acc, "seconds": round(time.perf_counter() - start)}
        print(json.dumps({name: result["levers"][name]}), flush=True)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
