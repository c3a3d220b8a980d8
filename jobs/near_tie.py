"""How far bf16 rounding moves the gap between a model's top two tokens: the data behind the
near-tie threshold that jobs/bench.py judges bf16 divergences by.

    python jobs/near_tie.py --prompts mixed --new-tokens 96 --threads 2 --json results/near_tie_bf16.json

For each prompt the fp32 model's greedy continuation is teacher-forced through the bf16 model
five ways: 1-token steps and 6-token passes, each on oneDNN and on ATen matmuls, and 6-token
passes on oneDNN with packed weights where this CPU can pack them (sdsat/decode/kernels.py). At every position, with a and b fp32's top two tokens, it records
the bf16 gap l[a] - l[b] of each variant. Two bf16 computations disagree on the argmax only
where their gaps differ by more than the fp32 gap, so the spread of gap differences between
variants (percentiles and maximum) bounds the fp32 margin at which a divergence can be rounding.
"""

from __future__ import annotations

import argparse


import torch

from jobs.prompts import load_prompts
from jobs.report import machine_info, write_json

VARIANTS = {"1-token, oneDNN": (1, "onednn"), "1-token, ATen": (1, "aten"), "6-token, oneDNN": (6, "onednn"), "6-token, ATen": (6, "aten"),
            "6-token, packed oneDNN": (6, "packed")}
PAIRS = (("1-token, ATen", "6-token, oneDNN"), ("1-token, oneDNN", "6-token, oneDNN"), ("1-token, ATen", "1-token, oneDNN"),
         ("1-token, ATen", "6-token, packed oneDNN"))
QUANTILES = (0.5, 0.9, 0.99, 0.999)


def teacher_forced(model, ids: list[int], start: int, width: int, kernel: str, packs=None) -> torch.Tensor:
    """[len(ids) - start + 1, V] logits predicting ids[start:] and one more, from passes of
    ``width`` tokens over a KV cache of the prefix ids[:start - 1], on ``kernel``'s matmuls."""
    from transformers import DynamicCache

    from sdsat.decode.kernels import using

    with using(kernel, packs):
        cache, out, pos = DynamicCache(), [], start - 1
        model(input_ids=torch.tensor([ids[:pos]]), past_key_values=cache, use_cache=True)
        while pos < len(ids):
            chunk = ids[pos : pos + width]
            out.append(model(input_ids=torch.tensor([chunk]), past_key_values=cache, use_cache=True).logits[0].float())
            pos += len(chunk)
        return torch.cat(out)


def spread(values: list[float]) -> dict:
    t = torch.tensor(values)
    return {**{str(q): round(float(t.quantile(q)), 4) for q in QUANTILES}, "max": round(float(t.max()), 4), "n": len(values)}


@torch.inference_mode()
def measure(model_name: str, prompts: list[str], new_tokens: int) -> dict:
    from sdsat.decode.packed import pack
    from sdsat.model.load import load_model

    f32, b16 = load_model(model_name, dtype="float32"), load_model(model_name, dtype="bfloat16")
    packs, why = pack(b16.model)
    variants = {name: v for name, v in VARIANTS.items() if v[1] != "packed" or packs is not None}
    pairs = [pair for pair in PAIRS if all(name in variants for name in pair)]
    if packs is None:
        print(f"no packed oneDNN variant: {why}")
    error = {name: [] for name in variants}  # |bf16 gap - fp32 gap|
    between = {pair: [] for pair in pairs}  # |gap of one bf16 variant - gap of another|
    for text in prompts:
        prompt = f32.tokenizer.encode(text)
        if len(prompt) < 2:
            raise ValueError(f"prompt {text!r} has fewer than 2 tokens")
        ids = f32.model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=f32.tokenizer.pad_token_id or 0)[0].tolist()
        ref = f32.model(torch.tensor([ids])).logits[0, len(prompt) - 1 :].float()
        top2 = ref.topk(2, -1).indices
        gap = lambda logits: (lambda g: g[:, 0] - g[:, 1])(logits.gather(1, top2))  # noqa: E731
        fp32_gap = gap(ref)
        gaps = {name: gap(teacher_forced(b16.model, ids, len(prompt), w, kernel, packs)[: ref.shape[0]]) for name, (w, kernel) in variants.items()}
        for name, g in gaps.items():
            error[name] += (g - fp32_gap).abs().tolist()
        for a, b in pairs:
            between[(a, b)] += (gaps[a] - gaps[b]).abs().tolist()
    return {"error_vs_fp32": {k: spread(v) for k, v in error.items()},
            "gap_difference": {f"{a} vs {b}": spread(v) for (a, b), v in between.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default-base")
    p.add_argument("--prompts", default="mixed")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.new_tokens < 1:
        p.error("--new-tokens must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from jobs.bench import NEAR_TIE

    result = {"model": args.model, "prompts": args.prompts, "new_tokens": args.new_tokens,
              "near_tie_threshold_fp32": NEAR_TIE["bfloat16"], **measure(args.model, load_prompts(args.prompts), args.new_tokens),
              "machine": machine_info()}
    for pair, s in result["gap_difference"].items():
        print(f"{pair:40} gap difference p50 {s['0.5']:.3f}  p99 {s['0.99']:.3f}  p99.9 {s['0.999']:.3f}  max {s['max']:.3f}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
