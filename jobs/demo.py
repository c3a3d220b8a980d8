"""The main job on the embedded default model: plain greedy vs SDSAT, side by side.

    python jobs/demo.py [--model default] [--num-sat 5] [--dtype bfloat16] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import logging
import time

from sdsat.generate import generate, make_sequences
from sdsat.models import load_model

PROMPTS = [
    "def is_prime(n: int) -> bool:\n",
    "from typing import List\n\n\ndef mean(values: List[float]) -> float:\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--num-sat", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args()

    loaded = load_model(args.model, dtype=args.dtype, add_sat=args.num_sat)
    trained = bool(loaded.sat and loaded.sat.num_sat_trained)
    print(f"model {args.model} ({loaded.path}), {args.dtype}, k={args.num_sat}, SATs trained: {trained}")
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    generate(loaded, make_sequences(loaded, prompts[:1], 4), args.num_sat)  # warm-up

    results = {}
    for name, k in (("plain", 0), ("sdsat", args.num_sat)):
        seqs = make_sequences(loaded, prompts, args.max_new_tokens)
        start = time.perf_counter()
        for seq in seqs:  # batch 1, as the paper measures
            generate(loaded, [seq], k)
        results[name] = (seqs, time.perf_counter() - start)

    (plain, plain_s), (sdsat, sdsat_s) = results["plain"], results["sdsat"]
    for text, a, b in zip(PROMPTS, plain, sdsat):
        print("=" * 72)
        print(text + b.text(loaded.tokenizer))
        print(f"--- same as plain greedy: {a.output_ids == b.output_ids}; tau {b.stats.tau:.2f}, "
              f"accepted {b.stats.accepted}/{b.stats.drafted} drafts")
    plain_tps = sum(len(s.output_ids) for s in plain) / plain_s
    sdsat_tps = sum(len(s.output_ids) for s in sdsat) / sdsat_s
    print("=" * 72)
    print(f"plain {plain_tps:.1f} tok/s, SDSAT {sdsat_tps:.1f} tok/s: {sdsat_tps / plain_tps:.2f}x")


if __name__ == "__main__":
    main()
