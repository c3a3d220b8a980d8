"""Acceptance of a model's SAT drafts on a few prompts: a quick check between recipes.

    python jobs/eval_acceptance.py --model DIR --prompts humaneval:5 --num-sat 5 --dtype bfloat16

Decodes with SDSAT only (no plain baseline, no timing) and prints tau (new tokens per
iteration), mean accepted drafts per iteration and acceptance per offset: the numbers
that decide the speed-up, overall and per prompt family (code: code, code edits, shell,
SQL; prose or chat) and kind where the prompts say. jobs/bench.py confirms with timings
and exactness.
"""

from __future__ import annotations

import argparse

from jobs.prompts import load_rows
from jobs.report import machine_info, sat_info, write_json
from sdsat.decode.generate import generate, make_sequences
from sdsat.model.draft_head import remove_head
from sdsat.model.load import load_model
from sdsat.decode.stats import DecodeStats


def acceptance(loaded, prompts: list[str], num_sat: int, max_new_tokens: int, tree: str | None = None,
               kinds: list[str | None] | None = None) -> dict:
    """SDSAT-decode each prompt (batch 1) and sum the decoding statistics. tree: verify this
    draft tree (sdsat.decode.tree; with a draft head every branch is chained through it)
    instead of the chain of top-1 drafts. kinds: each prompt's kind, to add ``per_family``
    and ``per_kind`` summaries."""
    total, groups = DecodeStats(), {}  # groups: (level, name) -> [summed stats, prompts]
    for text, kind in zip(prompts, kinds or [None] * len(prompts)):
        seqs = make_sequences(loaded, [loaded.tokenizer.encode(text)], max_new_tokens)
        generate(loaded, seqs, num_sat, tree=tree, two_step=True)
        total.add(seqs[0].stats)
        for key in ((("per_family", family(kind)), ("per_kind", kind)) if kind else ()):
            group = groups.setdefault(key, [DecodeStats(), 0])
            group[0].add(seqs[0].stats)
            group[1] += 1
    result = _summary(total)
    for (level, name), (stats, count) in sorted(groups.items()):
        result.setdefault(level, {})[name] = _summary(stats) | {"prompts": count}
    return result


def family(kind: str) -> str:
    """"prose or chat" for prose, prose edits and chat; "code" for the rest (code, code edits,
    shell, SQL)."""
    return "prose or chat" if kind.startswith(("prose", "chat")) else "code"


def _summary(stats: DecodeStats) -> dict:
    iterations = max(stats.iterations, 1)
    return {
        "tau": stats.tau,
        "accepted_per_iteration": stats.accepted / iterations,
        "accept_rate_per_offset": stats.accept_rate_per_offset,
        "iterations": stats.iterations,
        "new_tokens": stats.new_tokens,
        "verified_per_iteration": stats.drafted / iterations,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--prompts", default="humaneval:5")
    p.add_argument("--num-sat", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no-head", action="store_true", help="ignore the model's draft head: the SATs' own guesses")
    p.add_argument("--tree", default="", help="verify a draft tree, e.g. 4,2,1,1,1 or a jobs/tree_search.py spec (depth <= --num-sat); none: the chain")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype)
    if args.no_head and remove_head(loaded.model) is not None:
        loaded.sat.head = {}
    rows = load_rows(args.prompts)
    result = acceptance(loaded, [r["prompt"] for r in rows], args.num_sat, args.max_new_tokens, args.tree or None,
                        [r["kind"] for r in rows])
    result.update(machine=machine_info(), model=args.model, sats=sat_info(loaded), prompts=args.prompts, k=args.num_sat, dtype=args.dtype, tree=args.tree or None)
    rates = " ".join(f"{r:.2f}" for r in result["accept_rate_per_offset"])
    print(f"tau {result['tau']:.2f} | accepted/iteration {result['accepted_per_iteration']:.2f} | per offset {rates}")
    for name, part in result.get("per_family", {}).items():
        rates = " ".join(f"{r:.2f}" for r in part["accept_rate_per_offset"])
        print(f"  {name} ({part['prompts']} prompts): tau {part['tau']:.2f} | per offset {rates}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
