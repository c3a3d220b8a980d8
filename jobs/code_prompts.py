"""Write code prompts for self-distillation: the first tokens of packed Python
standard-library rows (the rows `dataset: stdlib` trains on).

    python jobs/code_prompts.py --out configs/data/code_prompts_more.json --skip 1024 --stride 4 \
        --exclude configs/data/artifact_prompts.json

configs/data/artifact_prompts.json holds rows 0..1023's first 64 tokens (Python 3.11's
standard library in rows of 256 default-model tokens); ``--skip 1024 --stride 4`` takes every
fourth row after those, so the prompts start in more places of more files. A prompt seen
before (the standard library repeats some files and headers) or in an --exclude file is left out. The output
depends on the Python version whose standard library is read; the committed file is the recipe.
The benchmark prompts (jobs/data/mixed_prompts.jsonl) are not code from the standard library.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N rows")
    parser.add_argument("--stride", type=int, default=1, help="take every Nth row after those")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--row-len", type=int, default=256)
    parser.add_argument("--exclude", default="", help="comma-separated prompt files whose prompts are left out")
    args = parser.parse_args(argv)
    from sdsat.training.config import load_config
    from sdsat.training.plan import check_model, packed_rows

    cfg = load_config(None, {"dataset": "stdlib", "row_len": args.row_len, "eval_every": 0}).model_dump()
    tokenizer, _ = check_model(cfg)
    rows = packed_rows(cfg, tokenizer, "train")[args.skip :: args.stride]
    seen = {tuple(p) for path in args.exclude.split(",") if path for p in json.loads(Path(path).read_text())}
    found = []
    for row in rows:
        prompt = tuple(int(t) for t in row[: args.prompt_len])
        if prompt not in seen:
            seen.add(prompt)
            found.append(list(prompt))
    Path(args.out).write_text("[\n" + ",\n".join(json.dumps(p, separators=(",", ":")) for p in found) + "\n]\n")
    print(f"{len(found)} prompts written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
