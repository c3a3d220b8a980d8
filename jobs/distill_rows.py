"""Self-distilled rows for jobs/head_levers.py: prompts followed by the base model's greedy continuation.

    python jobs/distill_rows.py --prompts configs/data/genre_prompts.json --out ROWS.json
    python jobs/distill_rows.py --prompts mixed --max-new-tokens 128 --out BENCH_ROWS.json
    python jobs/distill_rows.py --prompts A.json,B.json --batch-size 128 --out ROWS.json   # on a GPU
    python jobs/distill_rows.py --prompts A.json --sampled 2 --temperature 0.8 --out ROWS.json  # 3 rows a prompt
    python jobs/distill_rows.py --prompts A.json,B.json --sampled 2 --reuse GREEDY.json --out ROWS.json

--prompts: JSON files of token-id lists (comma-separated, interleaved) (configs/data/*_prompts.json, as fine-tuning's
``distill_prompts``) or a benchmark prompt set (mixed[:N], humaneval[:N], a JSONL file, as
jobs/bench.py takes). Writes a JSON list of token-id lists (prompt + continuation), the
format of fine-tuning's ``distill_cache``: every prompt's greedy row, then --sampled rounds of
sampled ones (fine-tuning's distill_sampled, seeded as it seeds them). --reuse takes the greedy
rows an earlier run made (of these prompts or others, in any order) instead of generating them
again, so the output is the same rows in the same order; with --max-minutes it is the longest
such prefix that was made in time. Rows made so far are saved to OUT.partial every minute, and
a rerun with the same arguments continues from there.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

import torch

from jobs.prompts import load_prompts
from sdsat.model.load import load_model
from sdsat.training.data import self_distill
from sdsat.training.distill import read_prompts, sampling_for, work_items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="default-base")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when torch sees one)")
    p.add_argument("--sampled", type=int, default=0, help="more continuations per prompt, sampled (fine-tuning's distill_sampled)")
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampled continuations")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning's seed: sampled rows equal those a run with this seed makes")
    p.add_argument("--reuse", default=None, help="a JSON file of greedy rows (an earlier run without --sampled): those of these prompts are not generated again")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after the batch that crosses this time (rows so far are kept)")
    args = p.parse_args(argv)
    if args.sampled < 0:
        p.error(f"--sampled must be >= 0, got {args.sampled}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    if all(re.search(r"\.json(\[[0-9:]*\])?$", part.strip()) for part in args.prompts.split(",")):
        prompts = read_prompts(args.prompts)
    else:
        prompts = [loaded.tokenizer.encode(text) for text in load_prompts(args.prompts)]
    budget = 60 * args.max_minutes if args.max_minutes else None
    items = work_items(prompts, args.sampled)
    reused = greedy_rows(args.reuse, prompts) if args.reuse else {}
    partial = Path(args.out + ".partial")  # what an interrupted run made: its rows are not made again
    done = json.loads(partial.read_text()) if partial.is_file() else []
    todo = [(prompt, j) for prompt, j in items if not (j == 0 and tuple(prompt) in reused)]
    if done:
        print(f"resuming: {len(done)} rows of {len(todo)} already made ({partial})")
    last_save = [time.monotonic()]

    def save(made: list[list[int]], every_s: float = 60.0) -> None:
        if time.monotonic() - last_save[0] >= every_s:
            partial.write_text(json.dumps(done + made))
            last_save[0] = time.monotonic()

    rest = todo[len(done) :]
    made = done + self_distill(loaded, [prompt for prompt, _ in rest], args.max_new_tokens, batch_size=args.batch_size,
                               max_seconds=budget, sampling=sampling_for(rest, args.temperature, args.seed), on_batch=save)
    rows = merge(items, reused, made)
    Path(args.out).write_text(json.dumps(rows))
    partial.unlink(missing_ok=True)
    print(f"{len(rows)} rows written to {args.out} ({sum(1 for p, j in items[: len(rows)] if j == 0 and tuple(p) in reused)} reused)")
    return 0


def merge(items, reused: dict, made: list[list[int]]) -> list[list[int]]:
    """The rows in the work list's order: reused greedy rows where there are, else the made
    ones in turn; it stops where the made rows stop (a time budget keeps a prefix)."""
    rows, made_rows = [], iter(made)
    for prompt, j in items:
        row = reused.get(tuple(prompt)) if j == 0 else None
        row = row if row is not None else next(made_rows, None)
        if row is None:
            break
        rows.append(row)
    return rows


def greedy_rows(path: str, prompts: list[list[int]]) -> dict[tuple[int, ...], list[int]]:
    """The rows of ``path`` that continue one of ``prompts``, by prompt."""
    wanted = {tuple(p) for p in prompts}
    lengths = {len(p) for p in prompts}
    found = {}
    for row in json.loads(Path(path).read_text()):
        for n in lengths:
            if tuple(row[:n]) in wanted and len(row) > n:
                found[tuple(row[:n])] = row
    return found


if __name__ == "__main__":
    raise SystemExit(main())
