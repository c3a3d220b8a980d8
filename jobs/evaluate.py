"""Evaluate a model: speed across k and batch size with plots, and the quality gate.

    python jobs/evaluate.py --model default --limit 82 --max-new-tokens 512 --json results/evaluate.json
    python jobs/evaluate.py --limit 2 --max-new-tokens 16 --k 1,2 --batch-sizes 1,2 --json /tmp/e.json  # smoke, < 1 min
    python jobs/evaluate.py --model EXPORT_DIR --base default --no-speed     # the quality gate alone

Speed across k is the paper's protocol: the first --limit HumanEval prompts (the paper: 82),
raw, no stop sequences, batch 1; plain greedy against SDSAT's two-step greedy iteration for
each k on the same model, plain first and then every k on each prompt in turn; wall time of
each generate call, prefill included. k above the model's SATs is dropped (the JSON says
where it was capped). Speed across batch size runs the default decoder against plain at each
batch size, on --batch-limit prompts (default: the largest batch size). Both report tokens/s,
speedup, tau (new tokens per iteration), tokens per pass and acceptance per draft offset,
and are drawn as PNG plots next to the JSON.

Quality (--base, or --quality for the model alone): pass@1 on HumanEval with completions run
in a sandbox, and the mean per-token log-likelihood of held-out text (sdsat/evaluation/gate.py).
With --base the export is judged against it: the verdict goes into the JSON, into the model's
directory when it is one (quality_gate.json), and a failing gate exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from jobs.eval_plots import plot_all
from jobs.report import machine_info, write_json
from sdsat.decode.batch import Sequence
from sdsat.decode.generate import default_scheduler, generate, make_sequences
from sdsat.decode.stats import DecodeStats
from sdsat.evaluation.gate import GateConfig, Verdict, held_out_texts, measure, run_gate, write_verdict
from sdsat.evaluation.problems import load_problems
from sdsat.evaluation.sandbox import network_namespace
from sdsat.model.load import LoadedModel, load_model

log = logging.getLogger("evaluate")
Decoder = Callable[[LoadedModel, list[Sequence]], None]


def decoder(name: str, k: int) -> Decoder:
    """The decoders compared. The one place that names decode options: adapt it when they change."""
    if name == "plain":
        return lambda loaded, seqs: generate(loaded, seqs, 0)
    if name == "two-step":  # the paper's iteration: a draft pass, then a verify pass, at a fixed k
        return lambda loaded, seqs: generate(loaded, seqs, k, two_step=True)
    if name == "default":  # what bench and serving run: the scheduled fused decoder, one scheduler per model
        return lambda loaded, seqs: generate(loaded, seqs, k)
    raise ValueError(f"unknown decoder {name!r}")


@dataclass
class Tally:
    """Tokens, wall seconds and decode statistics of one decoder over a sweep."""

    tokens: int = 0
    seconds: float = 0.0
    stats: DecodeStats = field(default_factory=DecodeStats)

    def run(self, decode: Decoder, loaded: LoadedModel, prompts: list[list[int]], max_new_tokens: int) -> None:
        seqs = make_sequences(loaded, prompts, max_new_tokens)
        start = time.perf_counter()
        decode(loaded, seqs)  # prefill included
        self.seconds += time.perf_counter() - start
        for seq in seqs:
            self.tokens += len(seq.output_ids)
            self.stats.add(seq.stats)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def compare(plain: Tally, sdsat: Tally, **fields) -> dict:
    return fields | {
        "plain_tokens_per_s": plain.tokens_per_s,
        "sdsat_tokens_per_s": sdsat.tokens_per_s,
        "speedup": sdsat.tokens_per_s / plain.tokens_per_s if plain.tokens_per_s else 0.0,
        "tau": sdsat.stats.tau,
        "tokens_per_forward": sdsat.stats.tokens_per_forward,
        "accept_rate_per_offset": sdsat.stats.accept_rate_per_offset,
    }


def speed_across_k(loaded: LoadedModel, prompts: list[list[int]], ks: list[int], max_new_tokens: int) -> list[dict]:
    plain, tallies = Tally(), {k: Tally() for k in ks}
    decoders = {k: decoder("two-step", k) for k in ks}
    for i, prompt in enumerate(prompts):
        plain.run(decoder("plain", 0), loaded, [prompt], max_new_tokens)
        for k in ks:
            tallies[k].run(decoders[k], loaded, [prompt], max_new_tokens)
        log.info("  k sweep: prompt %d of %d", i + 1, len(prompts))
    return [compare(plain, tallies[k], k=k, mean_wall_s_per_sample=tallies[k].seconds / len(prompts)) for k in ks]


def speed_across_batch(loaded: LoadedModel, prompts: list[list[int]], sizes: list[int], k: int,
                       max_new_tokens: int) -> list[dict]:
    out = []
    for size in sizes:
        plain, sdsat, default = Tally(), Tally(), decoder("default", k)
        for start in range(0, len(prompts), size):  # plain and SDSAT alternate, batch by batch
            chunk = prompts[start : start + size]
            plain.run(decoder("plain", 0), loaded, chunk, max_new_tokens)
            sdsat.run(default, loaded, chunk, max_new_tokens)
        out.append(compare(plain, sdsat, batch=size, rows=min(size, len(prompts)), k=k))
        log.info("  batch %d: %.2fx", size, out[-1]["speedup"])
    return out


def speed(args, loaded: LoadedModel) -> dict:
    model_k = loaded.sat.num_sat if loaded.sat else 0
    ks = [k for k in args.k if k <= model_k]
    if not ks:
        raise SystemExit(f"--model {args.model} has {model_k} SATs: no k of {args.k} fits")
    if len(ks) < len(args.k):
        log.warning("the model has %d SATs: k capped at %d (asked for %s)", model_k, model_k, args.k)
    prompts = [loaded.tokenizer.encode(p.prompt) for p in load_problems(max(args.limit, args.batch_limit))]
    warm = prompts[:1]  # first-call costs stay out of the timings
    for name in ("plain", "two-step", "default"):  # the default one measures its pass costs here
        Tally().run(decoder(name, max(ks)), loaded, warm, 4)
    return {
        "pass_cost": default_scheduler(loaded).cost.ratios(),
        "prompts": f"humaneval:{args.limit}",
        "batch_prompts": f"humaneval:{args.batch_limit}",
        "max_new_tokens": args.max_new_tokens,
        "k_asked": args.k,
        "k_capped_at": model_k if len(ks) < len(args.k) else None,
        "across_k": speed_across_k(loaded, prompts[: args.limit], ks, args.max_new_tokens),
        "across_batch": speed_across_batch(loaded, prompts[: args.batch_limit], args.batch_sizes, max(ks),
                                           args.max_new_tokens),
    }


def quality(args, loaded: LoadedModel) -> tuple[dict, Verdict | None]:
    cfg = GateConfig(problems=args.gate_problems, max_new_tokens=args.gate_max_new_tokens, dtype=args.gate_dtype,
                     device=args.device, max_pass_drop_points=args.max_pass_drop, max_loglik_drop=args.max_loglik_drop)
    if not args.base:
        problems = load_problems(cfg.problems)
        q = measure(loaded, problems, held_out_texts(problems), cfg)
        return {"model": _without_completions(vars(q)), "network_namespace": bool(network_namespace())}, None
    verdict = gate_models(args.base, args.model, cfg)
    summary = verdict.to_dict()
    for side in ("base", "export"):
        summary[side] = _without_completions(summary[side])
    return summary | {"network_namespace": bool(network_namespace())}, verdict


def gate_models(base: str, export: str, cfg: GateConfig = GateConfig()) -> Verdict:
    """Run the gate; write its verdict into the export's directory (when it is one)."""
    verdict = run_gate(base, export, cfg)
    if Path(export).expanduser().is_dir():
        path = write_verdict(verdict, Path(export).expanduser())
        log.info("verdict written to %s", path)
    print(verdict.summary())
    return verdict


def gate_export(base: str, export: str | Path, problems: int | None = None) -> int:
    """The gate of ``jobs/finetune.py --eval``: 0 when the export passes, 3 when it fails."""
    return 0 if gate_models(base, str(export), GateConfig(problems=problems)).passed else 3


def _without_completions(q: dict) -> dict:
    return {k: v for k, v in q.items() if k != "completions"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', a checkpoint or artifact directory, or a Hugging Face id")
    p.add_argument("--base", default="", help="judge --model against this base model (the quality gate)")
    p.add_argument("--limit", type=int, default=82, help="HumanEval prompts of the speed sweeps (the paper: 82)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens per prompt in the speed sweeps (the paper: 512)")
    p.add_argument("--k", type=_ks, default=list(range(1, 9)), help="k values of the two-step sweep: 1-8 or 1,2,5")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 4, 16], help="batch sizes of the default decoder")
    p.add_argument("--batch-limit", type=int, default=0,
                   help="HumanEval prompts of the batch sweep (default: the largest batch size, so it runs full)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the speed sweeps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True, help="run the speed sweeps")
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=None,
                   help="measure quality (default: only with --base)")
    p.add_argument("--gate-problems", type=int, default=GateConfig.problems, help="HumanEval problems scored")
    p.add_argument("--gate-max-new-tokens", type=int, default=GateConfig.max_new_tokens)
    p.add_argument("--gate-dtype", default=GateConfig.dtype, help="dtype of both models in the gate")
    p.add_argument("--max-pass-drop", type=float, default=GateConfig.max_pass_drop_points,
                   help="fail when pass@1 drops by more percentage points")
    p.add_argument("--max-loglik-drop", type=float, default=GateConfig.max_loglik_drop,
                   help="fail when the held-out log-likelihood drops by more nats per token")
    p.add_argument("--json", default="results/evaluate.json", help="write the results here")
    p.add_argument("--plots", default="", help="folder of the PNG plots (default: next to --json, named after it)")
    args = p.parse_args(argv)
    if args.limit < 1 or args.max_new_tokens < 1 or min(args.batch_sizes) < 1 or min(args.k) < 1:
        p.error("--limit, --max-new-tokens, --k and --batch-sizes must be >= 1")
    args.batch_limit = args.batch_limit or max(args.batch_sizes)
    if args.quality is None:
        args.quality = bool(args.base)
    if not args.speed and not args.quality:
        p.error("nothing to do: --no-speed without --base or --quality")
    return args


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _ks(text: str) -> list[int]:
    if "-" in text:
        lo, _, hi = text.partition("-")
        return list(range(int(lo), int(hi) + 1))
    return _ints(text)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "jobs/evaluate.py", *(sys.argv[1:] if argv is None else argv)])
    result: dict = {"command": command, "machine": machine_info(), "model": args.model, "base": args.base or None,
                    "dtype": args.dtype, "device": args.device}
    verdict, load_at_start = None, os.getloadavg()[0]
    if args.speed:
        result["speed"] = speed(args, load_model(args.model, dtype=args.dtype, device=args.device))
    if args.quality:
        loaded = None if args.base else load_model(args.model, dtype=args.gate_dtype, device=args.device)
        result["quality"], verdict = quality(args, loaded)
    result["load_average"] = [load_at_start, os.getloadavg()[0]]  # 1-minute, at start and end: a shared machine is noisy
    plots = Path(args.plots) if args.plots else Path(args.json).with_suffix("")
    if args.speed:  # stored relative to the JSON's folder, so the two move together
        drawn = plot_all(result, plots)
        result["plots"] = {name: os.path.relpath(path, Path(args.json).parent) for name, path in drawn.items()}
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return 1 if verdict is not None and not verdict.passed else 0


if __name__ == "__main__":
    sys.exit(main())
