"""Self-distilled rows for jobs/head_levers.py: prompts followed by the base model's greedy continuation.

    python jobs/distill_rows.py --prompts configs/data/genre_prompts.json --out ROWS.json
    python jobs/distill_rows.py --prompts mixed --max-new-tokens 128 --out BENCH_ROWS.json
    python jobs/distill_rows.py --prompts A.json,B.json --batch-size 128 --out ROWS.json   # on a GPU
    python jobs/distill_rows.py --prompts A.json --sampled 2 --temperature 0.8 --out ROWS.json  # 3 rows a prompt

--prompts: JSON files of token-id lists (comma-separated, interleaved) (configs/data/*_prompts.json, as fine-tuning's
``distill_prompts``) or a benchmark prompt set (mixed[:N], humaneval[:N], a JSONL file, as
jobs/bench.py takes). Writes a JSON list of token-id lists (prompt + continuation), the
format of fine-tuning's ``distill_cache``: every prompt's greedy row, then --sampled rounds of
sampled ones (fine-tuning's distill_sampled, seeded as it seeds them).
"""

from __future__ import annotations

import argparse
import json
import logging
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
    p.add_argument("--max-minutes", type=float, default=None, help="stop after the batch that crosses this time (rows so far are kept)")
    args = p.parse_args(argv)
    if args.sampled < 0:
        p.error(f"--sampled must be >= 0, got {args.sampled}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    if args.prompts.endswith(".json"):
        prompts = read_prompts(args.prompts)
    else:
        prompts = [loaded.tokenizer.encode(text) for text in load_prompts(args.prompts)]
    budget = 60 * args.max_minutes if args.max_minutes else None
    items = work_items(prompts, args.sampled)
    rows = self_distill(loaded, [prompt for prompt, _ in items], args.max_new_tokens, batch_size=args.batch_size, max_seconds=budget,
                        sampling=sampling_for(items, args.temperature, args.seed))
    Path(args.out).write_text(json.dumps(rows))
    print(f"{len(rows)} rows written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
