"""The peer to beat: transformers' own prompt-lookup decoding against its plain greedy generate.

    python jobs/bench_peer.py --prompts humaneval:20 --dtype bfloat16 --max-new-tokens 128 \
        --prompt-lookup 5 --threads 2 --json results/peer_prompt_lookup_bf16.json

Same prompts, model and token budget as ``jobs/bench.py``; plain and prompt lookup
alternate prompt by prompt so machine noise hits both alike, on the same CPU matmul kernels
as jobs/bench.py (``--kernels``). Prints and writes tokens/s,
the speedup and how many outputs equal plain greedy.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from jobs.prompts import load_prompts
from jobs.report import machine_info, write_json
from sdsat.decode.kernels import KernelChoice, choose_kernels
from sdsat.model.load import load_model

log = logging.getLogger("bench_peer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default-base", help="a model load_model takes (default: the bare default model)")
    p.add_argument("--prompts", default="mixed", help="as jobs/bench.py: mixed[:N], humaneval[:N], or a JSONL file")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-lookup", type=int, default=5, help="prompt_lookup_num_tokens")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--kernels", choices=("auto", "default"), default="auto",
                   help="CPU matmul kernels per pass width, as jobs/bench.py (auto: the faster of oneDNN and ATen)")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.prompt_lookup < 1:
        p.error("--max-new-tokens and --prompt-lookup must be >= 1")
    return args


def timed_generate(model, ids: torch.Tensor, args, lookup: int | None) -> tuple[list[int], float]:
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, **extra)
    return out[0, ids.shape[1] :].tolist(), time.perf_counter() - start


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    kernels = choose_kernels(loaded) if args.kernels == "auto" else KernelChoice(reason="--kernels default")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    prompts = [torch.tensor([tokenizer.encode(t)]) for t in load_prompts(args.prompts)]
    for lookup in (None, args.prompt_lookup):  # warm-up
        timed_generate(model, prompts[0][:, :8], argparse.Namespace(max_new_tokens=8), lookup)
    plain_tokens = peer_tokens = identical = 0
    plain_s = peer_s = 0.0
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            plain, secs = timed_generate(model, ids, args, None)
            plain_tokens, plain_s = plain_tokens + len(plain), plain_s + secs
            peer, secs = timed_generate(model, ids, args, args.prompt_lookup)
            peer_tokens, peer_s = peer_tokens + len(peer), peer_s + secs
            identical += plain == peer
            log.info("  prompt %d: plain %.1fs, prompt lookup %.1fs", i, plain_s, peer_s)
    result = {
        "model": args.model,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "machine": machine_info(),
        "torch": torch.__version__,
        "prompts": args.prompts,
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "prompt_lookup_num_tokens": args.prompt_lookup,
        "kernels": kernels.to_dict(),
        "plain_tokens_per_s": plain_tokens / plain_s,
        "prompt_lookup_tokens_per_s": peer_tokens / peer_s,
        "speedup": (peer_tokens / peer_s) / (plain_tokens / plain_s),
        "identical_outputs": identical,
    }
    print(f"\ntransformers plain {result['plain_tokens_per_s']:.2f} tok/s, prompt lookup "
          f"{result['prompt_lookup_tokens_per_s']:.2f} tok/s: {result['speedup']:.2f}x "
          f"({identical}/{len(prompts)} outputs identical; {result['dtype']}, {result['machine']['cpu']} {result['machine']['cpu_flags']})")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
