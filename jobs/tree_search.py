"""Pick draft trees for a model from the ranks its SAT drafts give the true tokens.

    python jobs/tree_search.py --model default --num-sat 5 --prompts humaneval:10 \
        --sizes 4,8,12,18 --json results/tree_search.json

Decodes the prompts with plain greedy, then runs one draft pass after every prefix of each
output and records, per depth, the rank of the true token among the SAT logits (with a draft
head: among the head's guesses given the true token before it, as its trees draft). For each
size it prints the best tree (sdsat.decode.tree.best_tree) and the accepted drafts per draft pass
it would give on these positions, next to the chain's; pass a spec to bench.py --tree.
Every position counts, while decoding drafts right after a rejection, so the estimate is
optimistic in absolute terms; compare trees with it, then measure with jobs/bench.py.
"""

from __future__ import annotations

import argparse
import logging

import torch

from jobs.prompts import load_prompts
from jobs.report import machine_info, write_json
from sdsat.decode.decoding import forward, prefill
from sdsat.decode.generate import generate, make_sequences
from sdsat.decode.kv_cache import SlotCache
from sdsat.model.draft_head import get_head, top_candidates
from sdsat.model.load import load_model
from sdsat.decode.tree import DraftTree, best_tree, true_token_ranks

log = logging.getLogger("tree_search")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', a checkpoint or artifact directory, or a Hugging Face id")
    p.add_argument("--num-sat", type=int, default=5, help="k: the trees' depth")
    p.add_argument("--prompts", default="humaneval:10", help="a JSONL file of {\"prompt\": ...}, or humaneval[:N]")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="4,8,12,18", help="candidate nodes per tree (the root not counted)")
    p.add_argument("--rows", type=int, default=32, help="draft passes per batch")
    p.add_argument("--json", default="", help="write the results here")
    return p.parse_args(argv)


@torch.inference_mode()
def rank_paths(loaded, sequences: list[list[int]], starts: list[int], k: int, rows: int) -> list[list[int]]:
    """Per position L >= starts[i] of sequences[i] (with k tokens after it): the rank of
    sequences[i][L + d] among the SAT logits at depth d, after the prefix sequences[i][:L]."""
    sat = torch.tensor(loaded.require_sat(k), device=loaded.device)
    banned = torch.tensor(loaded.sat.unique_ids, device=loaded.device)
    jobs = [(seq, at) for seq, start in zip(sequences, starts) for at in range(start, len(seq) - k)]
    out = []
    for first in range(0, len(jobs), rows):
        chunk = jobs[first : first + rows]
        cache = SlotCache.for_model(loaded.model, len(chunk))
        last = prefill(loaded.model, cache, [seq[:at] for seq, at in chunk], 0)  # [B]
        input_ids = torch.cat([last[:, None], sat[None].expand(len(chunk), -1)], dim=1)  # [B, k+1]
        logits = forward(loaded.model, cache, input_ids)[:, 1:].float()  # [B, k, V]
        true = torch.tensor([seq[at + 1 : at + 1 + k] for seq, at in chunk], device=loaded.device)  # [B, k]
        head = get_head(loaded.model)
        if head is None:
            out += true_token_ranks(logits, true, banned).tolist()
        else:  # the head's rank given the true token before: what its tree (DraftTree via the head) needs
            first = torch.tensor([seq[at] for seq, at in chunk], device=loaded.device)
            among = top_candidates(logits)
            ranks = head.true_ranks(head.hidden[:, 1:], first, head.hidden[:, 0], true, banned, among).tolist()
            reach = logits.shape[-1] if among is None else among.shape[-1]  # ranks past the candidates: no node
            out += [path[: next((d for d, r in enumerate(path) if r >= reach), len(path))] for path in ranks]
    return out


def accepted_per_pass(tree: DraftTree, observed: list[list[int]]) -> float:
    """Drafts the tree accepts per draft pass on these rank paths."""
    nodes = {()}
    paths = [()]
    for parent, rank in zip(tree.parents[1:], tree.ranks[1:]):
        paths.append(paths[parent] + (rank,))
    nodes.update(paths)
    total = sum(next(d for d in range(len(r), -1, -1) if tuple(r[:d]) in nodes) for r in observed)
    return total / max(1, len(observed))


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    k = args.num_sat
    prompts = [loaded.tokenizer.encode(t) for t in load_prompts(args.prompts)]
    plain = generate(loaded, make_sequences(loaded, prompts, args.max_new_tokens), 0)
    sequences = [p + s.output_ids for p, s in zip(prompts, plain)]
    observed = rank_paths(loaded, sequences, [len(p) for p in prompts], k, args.rows)
    chain = DraftTree.chain(k)
    result = {"model": args.model, "k": k, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
              "head": get_head(loaded.model) is not None, "positions": len(observed),
              "chain": accepted_per_pass(chain, observed), "trees": [], "machine": machine_info()}
    log.info("%d positions; chain (%d nodes): %.3f accepted drafts per pass", len(observed), chain.size, result["chain"])
    for size in (int(s) for s in args.sizes.split(",")):
        tree = best_tree(observed, size)
        accepted = accepted_per_pass(tree, observed)
        result["trees"].append({"nodes": tree.size, "spec": tree.spec, "accepted_per_pass": accepted})
        log.info("%3d nodes: %.3f accepted drafts per pass  --tree '%s'", tree.size, accepted, tree.spec)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
