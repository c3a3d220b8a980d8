"""Speed and exactness of SDSAT decoding vs plain decoding of the same model, greedy or sampled.

    python jobs/bench.py --model default --num-sat 5 --prompts humaneval:20 --max-new-tokens 128 \
        --dtype bfloat16 --json results/bench.json
    python jobs/bench.py --temperature 0.7 --top-p 0.9 --json results/bench_t07.json

The default decoder is exactly what serving runs: the fused one-pass iteration
(sdsat/decode/fused.py) with the drafts the scheduler (sdsat/decode/scheduler.py) chooses per
row and pass from a pass-cost curve measured here at start-up (reported as ``pass_cost``) and
online acceptance estimates: up to ``--lookup`` prompt-lookup trie nodes, pending SAT drafts
and a draft block of up to ``--num-sat`` SATs, or a plain step where drafting does not pay.
``--lookup 0``: SAT drafts only; ``--num-sat 0 --lookup N``: prompt lookup only;
``--two-step``: the paper's draft-pass-then-verify-pass iteration at a fixed k, which
``--tree`` and ``--oracle-drafts`` use.
On a CPU in bf16 both runs use the faster matmul kernel per pass width (``--kernels auto``,
sdsat/decode/kernels.py), so the baseline is the fastest plain decoding, not a slow kernel.
Plain and SDSAT runs alternate batch by batch in one process, after a warm-up; with the
default decoder they run in lockstep (``--timing lockstep``, the default): one pass of the
plain batch, one of the SDSAT batch, each timed alone, which goes first flipping every pair
(each side's prefill and first token timed apart, as ``prefill_s``),
so the machine's drift (on a shared 2-core VM, +-10% between consecutive 25-second runs)
falls on both sides alike instead of on whichever run it hit. In fp32 the
outputs must be identical; in bf16/fp16 a pass over k+1 tokens rounds differently from
one-token steps, so each divergence is reported with the fp32 logit margin between the two
tokens there: a near-tie is rounding, anything else is a bug.
``--temperature T`` (with ``--top-p``, ``--seed``): plain sampling vs SDSAT sampling, prompt i
seeded with seed + i in both runs. Speculative sampling keeps plain sampling's distribution
exactly, and each output token is drawn with its own position's uniform, so the same seeds give
the same tokens up to rounding: ``token_match_rate`` (divergences are not judged: a draw near a
boundary of the CDF flips with rounding, whatever the logit margin).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from jobs.prompts import load_prompts
from jobs.report import machine_info, sat_info, write_json
from sdsat.decode.calibrate import measured_scheduler
from sdsat.decode.kernels import KernelChoice, choose_kernels
from sdsat.decode.generate import DEFAULT_LOOKUP, generate, make_sequences, oracle_drafts, stream
from sdsat.decode.scheduler import Scheduler
from sdsat.model.load import load_model
from sdsat.decode.stats import DecodeStats
from sdsat.decode.target import SamplingParams
from sdsat.decode.tree import DraftTree

log = logging.getLogger("bench")
# fp32 logit margin under which a divergence counts as rounding, per benchmarked dtype. bf16
# keeps 8 significant bits: logits of magnitude 16-32 are spaced 0.125 apart before any
# error accumulates over the layers, so two tokens closer than two such steps can swap.
NEAR_TIE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', a checkpoint or artifact directory, or a Hugging Face id")
    p.add_argument("--num-sat", type=int, default=5, help="k: SATs (drafts) per iteration")
    p.add_argument("--prompts", default="mixed", help="mixed[:N] (code, edits, shell, SQL, prose, chat), humaneval[:N], or a JSONL file of {\"prompt\": ...}")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 (float16 on GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); none by default")
    p.add_argument("--tree", default="", help="verify a draft tree, e.g. 2,2,1,1,1 (depth <= --num-sat); none: the chain")
    p.add_argument(
        "--two-step", action="store_true",
        help="the paper's iteration (a draft pass, then a verify pass) instead of the fused one-pass iteration",
    )
    p.add_argument("--lookup", type=int, default=DEFAULT_LOOKUP, help="prompt-lookup trie nodes a row may offer per pass (0: none)")
    p.add_argument(
        "--kernels", choices=("auto", "default"), default="auto",
        help="CPU matmul kernels: auto measures oneDNN against ATen per pass width and uses the faster for plain and "
             "SDSAT passes alike (sdsat/decode/kernels.py); default: torch's (oneDNN throughout)",
    )
    p.add_argument("--calibration-budget", type=float, default=8.0, help="seconds of start-up pass-cost measurement")
    p.add_argument("--oracle-drafts", action="store_true", help="draft the true continuation: the decoder's ceiling")
    p.add_argument("--add-sat", type=int, default=0, help="add this many untrained SATs to a model that has none")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--temperature", type=float, default=0.0, help="> 0: plain vs SDSAT sampling at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass")
    p.add_argument("--seed", type=int, default=0, help="sampling: prompt i is seeded with seed + i (in both runs)")
    p.add_argument(
        "--rounds", type=int, default=2,
        help="passes over the prompt set, plain and SDSAT alternating which goes first (speed drifts on shared machines)",
    )
    p.add_argument(
        "--timing", choices=("lockstep", "runs"), default="lockstep",
        help="lockstep: plain and SDSAT batches take turns pass by pass, each pass timed (the default decoder); "
             "runs: each batch decoded whole, plain and SDSAT runs alternating",
    )
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.tree or args.oracle_drafts:
        args.two_step = True  # both are two-step features
    if args.lookup < 0:
        p.error("--lookup must be >= 0")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.two_step:
        args.lookup = 0
    if args.num_sat < 0 or (args.num_sat == 0 and not args.lookup):
        p.error("--num-sat must be >= 1 (0 only with --lookup N: prompt lookup alone)")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        p.error("--max-new-tokens and --batch-size must be >= 1")
    if args.temperature:
        if args.two_step:
            p.error("--temperature: sampling verifies drafts in the fused iteration only (no --two-step, --tree, --oracle-drafts)")
        try:
            SamplingParams(args.temperature, args.top_p)
        except ValueError as exc:
            p.error(str(exc))
    if args.tree:
        try:
            depth = DraftTree.parse(args.tree).depth
        except ValueError as exc:
            p.error(f"--tree: {exc}")
        if depth > args.num_sat:
            p.error(f"--tree {args.tree} has depth {depth}: it needs --num-sat >= {depth}")
    return args


def run(loaded, prompts, args, k: int, references=None, draft: bool = True, scheduler: Scheduler | None = None, first: int = 0):
    """Decode every prompt in batches (draft=False: plain decoding; else the default decoder
    with this scheduler, or the two-step iteration), greedy or sampled (prompt i, counted from
    ``first``, seeded with args.seed + i); return (outputs, stats, seconds)."""
    outputs, stats, seconds = [], [], 0.0
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        seqs = make_sequences(loaded, chunk, args.max_new_tokens, stop=tuple(args.stop))
        sampling = _sampling(args, len(chunk), first + start)
        override = None
        if references is not None:
            refs = references[start : start + args.batch_size]
            override = oracle_drafts({s.seq_id: r for s, r in zip(seqs, refs)}, regenerate=plain_continuation(loaded))
        t0 = time.perf_counter()
        if not draft:
            generate(loaded, seqs, 0, sampling=sampling)
        elif args.two_step:
            generate(loaded, seqs, k, override, args.tree or None, two_step=True)
        else:
            generate(loaded, seqs, k, lookup=args.lookup, scheduler=scheduler, sampling=sampling)
        seconds += time.perf_counter() - t0
        if override is not None:  # leave out the untimed re-derivation of oracle references
            seconds -= override.seconds
            for seq in seqs:
                seq.stats.decode_s = max(seq.stats.forward_s, seq.stats.decode_s - override.seconds)
        outputs += [s.output_ids for s in seqs]
        stats += [s.stats for s in seqs]
    return outputs, stats, seconds


def _sampling(args, n: int, first: int) -> list[SamplingParams] | None:
    """Sampling params of n prompts counted from ``first`` (prompt i seeded with seed + i); None: greedy."""
    if not args.temperature:
        return None
    return [SamplingParams(args.temperature, args.top_p, args.seed + first + i) for i in range(n)]


def run_lockstep(loaded, chunk, args, k: int, scheduler: Scheduler, first: int = 0, plain_first: bool = True, prefill_s: dict | None = None):
    """One batch of prompts (counted from ``first``) decoded plainly and by the default decoder,
    one pass of each in turn, every pass timed alone. The order within a pair flips after
    every pair (plain-SDSAT, SDSAT-plain, ...; the first: ``plain_first``): whatever the
    second pass of a pair pays or saves for following the first falls on both sides alike.
    Each side's first call (prefill and first token) adds to ``prefill_s[side]``, not to its seconds.
    Returns ((plain outputs, stats, seconds), (SDSAT outputs, stats, seconds))."""
    sampling = _sampling(args, len(chunk), first)
    prefill_s = {} if prefill_s is None else prefill_s
    seqs = {kind: make_sequences(loaded, chunk, args.max_new_tokens, stop=tuple(args.stop)) for kind in ("plain", "sdsat")}
    steps = {
        "plain": stream(loaded, seqs["plain"], 0, sampling=sampling),
        "sdsat": stream(loaded, seqs["sdsat"], k, lookup=args.lookup, scheduler=scheduler, sampling=sampling),
    }
    seconds = dict.fromkeys(steps, 0.0)
    order = ["plain", "sdsat"] if plain_first else ["sdsat", "plain"]
    # Each side's first call (its prefill, cache allocation and first token) is timed apart,
    # as ``prefill_s``: it is the same work on both sides, and in lockstep A/A probes (two
    # identical plain batches, batch 16) the side that allocated second paid up to ~15% of
    # its whole time more there; with it apart they measured 0.98-1.005x.
    into = prefill_s  # the first pair of calls; every later pair: ``seconds``
    while order:
        for kind in list(order):
            t0 = time.perf_counter()
            done = next(steps[kind], None) is None
            into[kind] = into.get(kind, 0.0) + time.perf_counter() - t0
            if done:
                order.remove(kind)
        order.reverse()
        into = seconds
    return tuple(([q.output_ids for q in seqs[kind]], [q.stats for q in seqs[kind]], seconds[kind]) for kind in ("plain", "sdsat"))


def run_pair(loaded, chunk, args, k: int, scheduler: Scheduler, first: int, plain_first: bool, lockstep: bool, references, prefill_s=None):
    """One batch decoded both ways: in lockstep, or as two whole runs in the given order (the
    oracle's references: ``references``, else this batch's plain run, which then goes first)."""
    if lockstep:
        return run_lockstep(loaded, chunk, args, k, scheduler, first, plain_first, prefill_s)
    sides = {}
    for kind in ("plain", "sdsat") if plain_first else ("sdsat", "plain"):
        if kind == "plain":
            sides[kind] = run(loaded, chunk, args, 0, draft=False, first=first)
        else:
            refs = (references or sides["plain"][0]) if args.oracle_drafts else None
            sides[kind] = run(loaded, chunk, args, k, refs, scheduler=scheduler, first=first)
    return sides["plain"], sides["sdsat"]


def plain_continuation(loaded):
    """The plain greedy continuation of a sequence's output so far (oracle drafts follow the
    decoder's own trajectory after a bf16 near-tie flip, instead of a stale plain run)."""

    def regenerate(seq) -> list[int]:
        remaining = max(1, seq.max_new_tokens - len(seq.output_ids))
        (again,) = generate(loaded, make_sequences(loaded, [seq.prompt_ids + seq.output_ids], remaining), 0)
        return again.output_ids

    return regenerate


def total(stats: list[DecodeStats]) -> DecodeStats:
    out = DecodeStats()
    for s in stats:
        out.add(s)
    return out


def divergences(args, prompts, plain, sdsat) -> list[dict]:
    """Where SDSAT and plain outputs differ: position and the fp32 logit margin there."""
    found = []
    fp32 = None
    for i, (p, a, b) in enumerate(zip(prompts, plain, sdsat)):
        at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if at is None and len(a) == len(b):
            continue
        if at is None:  # one stopped earlier: differ at the shorter length
            found.append({"prompt": i, "position": min(len(a), len(b)), "margin_fp32": None})
            continue
        if args.temperature:  # a sampled divergence is a draw near a CDF boundary: not judged
            found.append({"prompt": i, "position": at, "plain": a[at], "sdsat": b[at], "margin_fp32": None})
            continue
        if fp32 is None:
            fp32 = load_model(args.model, dtype="float32", device=args.device, add_sat=args.add_sat)
        with torch.inference_mode():
            logits = fp32.model(torch.tensor([p + a[:at]], device=args.device)).logits[0, -1].float()
        margin = abs(float(logits[a[at]] - logits[b[at]]))
        found.append({"prompt": i, "position": at, "plain": a[at], "sdsat": b[at], "margin_fp32": margin})
    return found


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    add_sat = args.add_sat or (args.num_sat if args.oracle_drafts else 0)
    args.add_sat = add_sat
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, add_sat=add_sat)
    loaded.require_sat(args.num_sat)
    texts = load_prompts(args.prompts)
    prompts = [loaded.tokenizer.encode(t) for t in texts]
    k = args.num_sat
    log.info("model %s, %s, k=%d, batch %d, %d prompts, %d new tokens, %s", args.model, args.dtype, k,
             args.batch_size, len(prompts), args.max_new_tokens,
             f"temperature {args.temperature}, top-p {args.top_p}" if args.temperature else "greedy")

    kernels = choose_kernels(loaded) if args.kernels == "auto" else KernelChoice(reason="--kernels default")
    # The pass-cost curve, measured as a replica measures it; one scheduler for the whole run
    # (it learns acceptance across prompts), fed by timed passes only.
    t0 = time.perf_counter()
    scheduler = measured_scheduler(loaded, budget_s=args.calibration_budget, pad_id=loaded.tokenizer.pad_token_id or 0)
    calibration_s = time.perf_counter() - t0
    log.info("pass cost (x a 1-token pass, batch 1): %s, measured in %.1f s",
             {n: round(r, 2) for n, r in scheduler.cost.ratios().items()}, calibration_s)
    # Warm-up at the bench's batch size: the first prefill and passes of a batch shape cost
    # more, and in round 0 whichever side went first paid that (fp32 batch 16: a 1.20x round 0
    # of two all-plain sides, when warmed at batch 1 only).
    warm = argparse.Namespace(**{**vars(args), "max_new_tokens": 8, "stop": []})
    run(loaded, prompts[: args.batch_size], warm, 0, draft=False)
    run(loaded, prompts[: args.batch_size], warm, k, scheduler=Scheduler(scheduler.cost))
    # Rounds over the whole prompt set, plain and SDSAT interleaved batch by batch, in the
    # order plain-SDSAT in even rounds and SDSAT-plain in odd ones: on a shared machine speed
    # drifts by several percent over a minute, and the alternation cancels a steady drift.
    plain_out, plain_stats, sdsat_stats, per_round = [], [], [], []  # plain_out: round 0's, the oracle's reference
    plain_s = sdsat_s = 0.0
    plain_tokens = sdsat_tokens = 0
    diffs, matched = [], 0
    step = args.batch_size
    lockstep = args.timing == "lockstep" and not (args.two_step or args.oracle_drafts)
    prefill_s = {"plain": 0.0, "sdsat": 0.0}  # lockstep: each side's first calls, timed apart
    for round_ in range(args.rounds):
        round_plain, round_sdsat, round_plain_s, round_sdsat_s = [], [], 0.0, 0.0
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            # the oracle: round 0's plain outputs (round 0 runs each batch's plain run first)
            (out, stats, secs), (s_out, s_stats, s_secs) = run_pair(
                loaded, chunk, args, k, scheduler, start, round_ % 2 == 0, lockstep, plain_out[start : start + step], prefill_s
            )
            round_plain += out
            plain_stats += stats
            round_plain_s += secs
            round_sdsat += s_out
            sdsat_stats += s_stats
            round_sdsat_s += s_secs
            log.info("  round %d, prompts %d-%d: plain %.1fs, sdsat %.1fs", round_, start, start + len(chunk) - 1,
                     round_plain_s, round_sdsat_s)
        if round_ == 0:
            plain_out = round_plain
        round_diffs = divergences(args, prompts, round_plain, round_sdsat)
        diffs += [{**d, "round": round_} for d in round_diffs]
        matched += sum(
            next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            for a, b in zip(round_plain, round_sdsat)
        )
        n_plain, n_sdsat = sum(len(o) for o in round_plain), sum(len(o) for o in round_sdsat)
        per_round.append((n_sdsat / round_sdsat_s) / (n_plain / round_plain_s))
        plain_tokens += n_plain
        sdsat_tokens += n_sdsat
        plain_s += round_plain_s
        sdsat_s += round_sdsat_s

    dtype_name = str(loaded.dtype).removeprefix("torch.")
    agg = total(sdsat_stats)
    result = {
        "model": args.model,
        "sats": sat_info(loaded),
        "dtype": dtype_name,
        "device": args.device,
        "machine": machine_info(),
        "torch": torch.__version__,
        "k": k,
        "batch": args.batch_size,
        "prompts": args.prompts,
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "stop": args.stop,
        "oracle_drafts": args.oracle_drafts,
        "tree": args.tree or None,
        "decoder": "two-step" if args.two_step else "scheduled",
        "timing": "lockstep, prefill apart" if lockstep else "alternating runs",
        "prefill_s": {kind: round(v, 3) for kind, v in prefill_s.items()} if lockstep else None,
        "temperature": args.temperature,
        "top_p": args.top_p if args.temperature else None,
        "seed": args.seed if args.temperature else None,
        "lookup": args.lookup,
        "kernels": kernels.to_dict(),
        "pass_cost": scheduler.cost.ratios(),
        "pass_cost_1_token_s": scheduler.cost.curve[1],
        "calibration_s": calibration_s,
        "scheduler": scheduler.snapshot() if not args.two_step else None,
        "plain_tokens_per_s": plain_tokens / plain_s,
        "sdsat_tokens_per_s": sdsat_tokens / sdsat_s,
        "speedup": (sdsat_tokens / sdsat_s) / (plain_tokens / plain_s),
        "rounds": args.rounds,
        "speedup_per_round": per_round,
        "tau": agg.tau,
        "tokens_per_forward": agg.tokens_per_forward,
        "accept_rate": agg.accept_rate,
        "accept_rate_per_offset": agg.accept_rate_per_offset,
        "overhead_fraction": agg.overhead_fraction,
        "identical": not diffs,
        "token_match_rate": matched / max(1, plain_tokens),
        "mismatches": diffs,
        "near_tie_threshold_fp32": NEAR_TIE[dtype_name],
        "non_tie_mismatches": [
            d for d in diffs if d["margin_fp32"] is not None and d["margin_fp32"] >= NEAR_TIE[dtype_name]
        ],
    }
    print_table(result)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


def print_table(r: dict) -> None:
    print()
    mode = f"sampling at T={r['temperature']}, top-p {r['top_p']}" if r["temperature"] else "greedy"
    print(f"{'':22}{'plain':>12}{'sdsat':>12}   ({mode})")
    print(f"{'tokens/s':22}{r['plain_tokens_per_s']:>12.2f}{r['sdsat_tokens_per_s']:>12.2f}")
    print(f"speedup               {r['speedup']:.2f}x   (model {r['model']}, {r['dtype']}, k={r['k']}, batch {r['batch']})")
    print(f"tau                   {r['tau']:.2f} tokens/iteration, {r['tokens_per_forward']:.2f} tokens/forward")
    rates = " ".join(f"{x:.2f}" for x in r["accept_rate_per_offset"])
    print(f"accept rate/offset    {rates}")
    print(f"time outside forwards {100 * r['overhead_fraction']:.1f}%")
    print(f"identical             {r['identical']}  (token match rate {100 * r['token_match_rate']:.1f}%)")
    for d in r["mismatches"]:
        margin = d["margin_fp32"]
        kind = "" if margin is None else (" (near-tie)" if margin < r["near_tie_threshold_fp32"] else " (NOT a near-tie)")
        print(f"  divergence: prompt {d['prompt']} token {d['position']}, fp32 margin {margin}{kind}")


if __name__ == "__main__":
    sys.exit(1 if main()["non_tie_mismatches"] else 0)
