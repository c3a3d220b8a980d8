"""One check of a GPU machine: lossless output, decode speed, pass cost and fine-tuning speed, as JSON.

    python jobs/gpu_check.py --dummy-weights --out results/gpu_check_h200.json   # 1B and 7B Llama shapes
    python jobs/gpu_check.py --small --out /tmp/gpu_check.json                    # tiny shapes: a CPU smoke run

No download: ``--dummy-weights`` builds random Llama models at real shapes (Llama-3.2-1B,
CodeLlama-7B; untrained SATs are the last k vocabulary ids). Random weights accept no SAT
drafts, so drafts come from an oracle (the plain greedy continuation): the numbers are the
decoder's ceiling at acceptance k per iteration, which is what the GPU targets are about.
Measured per shape:
- lossless: SDSAT (two-step iteration, oracle and always-wrong drafts) against plain greedy,
  token for token, in fp32 and in bf16; a divergence reports the plain model's top-2 logit
  margin there (a near-tie when it is within 2 epsilons of the dtype, relative to the top logit);
- plain and SDSAT tokens/s at batch 1, 4 and 16 (bf16, k = 5), beside the weight-bandwidth
  floor of a plain step (weight bytes / measured device copy bandwidth);
- the pass-cost curve: one pass over 1..32 query tokens, relative to one token;
- fine-tuning tokens/s of the training loop's own step: full fine-tuning sharded with the
  job's FSDP wrapping (over one rank here) and the SAT adapter (DDP strategy, one rank).
Targets on one H100/H200, 7B, bf16, batch 1, k = 5: SDSAT >= 3x plain, plain within 1.5x of the
floor, a 6-token pass within 1.1x of a 1-token pass.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jobs.bench import plain_continuation
from sdsat.decode.compiled import compile_decode
from sdsat.decode.decoding import forward, prefill
from sdsat.decode.generate import generate, make_sequences, oracle_drafts
from sdsat.decode.kv_cache import SlotCache
from sdsat.model.load import LoadedModel
from sdsat.model.sat import SATConfig

SHAPES = {  # LlamaConfig fields
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32016, max_position_embeddings=16384, rope_theta=1e6),
}
NEAR_TIE_EPS = 2  # a top-2 logit gap within this many dtype epsilons of the top logit is a near-tie


class NoTokenizer:
    """The decoder needs a pad id only (no EOS, no stop strings)."""

    pad_token_id = 0
    eos_token_id = None


def dummy_model(shape: str, k: int, device: str, seed: int = 0) -> LoadedModel:
    """A random fp32 Llama at this shape on ``device``; its last k ids serve as SATs."""
    config = LlamaConfig(**SHAPES[shape], eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    vocab = config.vocab_size
    sat = SATConfig(sat_ids=list(range(vocab - k, vocab)), sat_tokens=[f"<sat_{i}>" for i in range(1, k + 1)])
    return LoadedModel(model=model, tokenizer=NoTokenizer(), sat=sat, source=f"dummy-{shape}", path="")


def prompts_for(loaded: LoadedModel, batch: int, length: int, seed: int, ragged: bool = False) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = loaded.sat.sat_ids[0]  # standard ids only
    return [torch.randint(3, vocab, (length - (3 * i if ragged else 0),), generator=g).tolist() for i in range(batch)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(loaded: LoadedModel, prompts, new_tokens: int, k: int = 0, references=None, wrong: bool = False):
    """The one call to the decoder: plain greedy (k = 0) or SDSAT's two-step iteration with
    drafts from an oracle (``references``: the plain outputs). Returns (sequences, seconds,
    seconds the oracle spent re-deriving references after a near-tie flip: not in the first)."""
    seqs = make_sequences(loaded, prompts, new_tokens, eos=False)
    override = None
    if k:
        vocab = loaded.sat.sat_ids[0]
        regenerate = None if wrong else plain_continuation(loaded)
        override = oracle_drafts({s.seq_id: r for s, r in zip(seqs, references)}, wrong=wrong, vocab_size=vocab,
                                 regenerate=regenerate)
    device = loaded.model.device
    sync(device)
    start = time.perf_counter()
    generate(loaded, seqs, k, override, two_step=k > 0)
    sync(device)
    oracle_s = override.seconds if override is not None else 0.0
    return seqs, time.perf_counter() - start - oracle_s, oracle_s


def lossless(loaded: LoadedModel, k: int, new_tokens: int) -> dict:
    """SDSAT (oracle drafts, always-wrong drafts) against plain greedy, per row."""
    prompts = prompts_for(loaded, 4, 48, seed=1, ragged=True)
    plain, _, _ = decode(loaded, prompts, new_tokens)
    refs = [s.output_ids for s in plain]
    out = {}
    for name, wrong in (("oracle", False), ("wrong", True)):
        seqs, _, _ = decode(loaded, prompts, new_tokens, k, refs, wrong=wrong)
        rows = [divergence(loaded, p, r, s.output_ids) for p, r, s in zip(prompts, refs, seqs)]
        out[name] = {"equal_rows": sum(r is None for r in rows), "rows": len(rows),
                     "divergences": [r for r in rows if r is not None]}
    return out


@torch.inference_mode()
def divergence(loaded: LoadedModel, prompt: list[int], plain: list[int], sdsat: list[int]) -> dict | None:
    """None if equal; else where they part and the plain model's top-2 margin there."""
    if plain == sdsat:
        return None
    at = next(i for i, (a, b) in enumerate(zip(plain, sdsat)) if a != b)
    ids = torch.tensor([prompt + plain[:at]], device=loaded.model.device)
    logits = loaded.model(ids).logits[0, -1].float()
    logits[loaded.sat.sat_ids] = float("-inf")
    top = logits.topk(2).values
    margin = float(top[0] - top[1])
    tie = NEAR_TIE_EPS * torch.finfo(loaded.dtype).eps * max(abs(float(top[0])), 1.0)  # the pass's rounding scale
    return {"at": at, "margin": margin, "top_logit": float(top[0]), "near_tie": margin <= tie}


def speed(loaded: LoadedModel, batch: int, k: int, new_tokens: int, prompt_len: int) -> dict:
    prompts = prompts_for(loaded, batch, prompt_len, seed=batch)
    decode(loaded, prompts, 4)  # warm-up
    plain, plain_s, _ = decode(loaded, prompts, new_tokens)
    seqs, sdsat_s, oracle_s = decode(loaded, prompts, new_tokens, k, [s.output_ids for s in plain])
    tokens = sum(len(s.output_ids) for s in seqs)
    iterations = sum(s.stats.iterations for s in seqs)
    return {"batch": batch, "plain_tok_s": batch * new_tokens / plain_s, "sdsat_tok_s": tokens / sdsat_s,
            "speedup": (tokens / sdsat_s) / (batch * new_tokens / plain_s), "plain_ms_per_step": 1000 * plain_s / new_tokens,
            "tau": tokens / max(iterations, 1), "oracle_rederive_s": oracle_s, "same_as_plain": sum(s.output_ids == p.output_ids for s, p in zip(seqs, plain))}


@torch.inference_mode()
def pass_costs(loaded: LoadedModel, sizes: list[int], context: int, reps: int) -> dict:
    """Median seconds of one pass over q new tokens after ``context`` cached ones (batch 1)."""
    model, device = loaded.model, loaded.model.device
    cache = SlotCache.for_model(model, 1)
    prefill(model, cache, prompts_for(loaded, 1, context + 1, seed=7), pad_id=0)
    ids = torch.tensor(prompts_for(loaded, 1, max(sizes), seed=8), device=device)
    times = {}
    for q in sizes:
        runs = []
        for _ in range(reps + 1):
            sync(device)
            start = time.perf_counter()
            forward(model, cache, ids[:, :q])
            sync(device)
            runs.append(time.perf_counter() - start)
        times[q] = statistics.median(runs[1:])  # the first run warms up this shape
    return {"context": context, "seconds": times, "relative": {q: t / times[sizes[0]] for q, t in times.items()}}


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    x = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync(device)
    return 2 * 5 * x.numel() / (time.perf_counter() - start)


def finetune_speed(loaded: LoadedModel, train: str, strategy: str, row_len: int, batch_size: int, k: int) -> dict:
    """Tokens/s of one optimizer step (after one warm-up step) of the fine-tuning loop's own step."""
    import torch.distributed as dist

    device = loaded.model.device
    own_group = not dist.is_initialized()
    if own_group:  # a one-process group: what the fine-tuning job's workers run in
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"  # collectives on either kind of tensor
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        return _finetune_step(loaded, train, strategy, row_len, batch_size, k, dist.get_world_size())
    finally:
        if own_group:
            dist.destroy_process_group()


def _finetune_step(loaded: LoadedModel, train: str, strategy: str, row_len: int, batch_size: int, k: int, world: int) -> dict:
    from sdsat.training.config import FinetuneConfig
    from sdsat.training.fsdp import shard
    from sdsat.training.loop import RowStream, train_step
    from sdsat.training.rows import RowConfig
    from sdsat.training.setup import LossModule, loss_config, make_optimizer, make_scheduler, select_trainable, wrap

    device = loaded.model.device
    cfg = FinetuneConfig(train=train, num_sat=k, strategy=strategy, row_len=row_len, batch_size=batch_size,
                         precision="bf16", use_gpu=device.type == "cuda").model_dump()
    sat_ids = loaded.sat.ids_for(k)
    fsdp = strategy == "fsdp"
    options = select_trainable(loaded.model, sat_ids, cfg, cast_frozen=not fsdp)
    module = LossModule(loaded.model, loss_config(cfg, loaded.sat.unique_ids))
    if fsdp:  # the fine-tuning job's FSDP wrapping (bf16 MixedPrecisionPolicy), over this one rank
        shard(module, cfg)
    else:
        module = wrap(module, cfg, device, world)
    module.train()
    optimizer = make_optimizer(module, options, device)
    scheduler = make_scheduler(optimizer, cfg)
    rows = RowStream(prompts_for(loaded, 8, row_len, seed=9), sat_ids, RowConfig(k, cfg["poisson_lambda"], cfg["max_blocks"]), 0)
    state = {"step": 0, "samples": 0, "train_s": 0.0}
    train_step(module, optimizer, scheduler, rows, cfg, 0, 1, device, 0, state)  # warm-up
    sync(device)
    metrics = train_step(module, optimizer, scheduler, rows, cfg, 0, 1, device, 0, state)
    sync(device)
    return {"train": train, "strategy": cfg["strategy"], "wrapped_as": type(module).__name__, "row_len": row_len,
            "batch_size": batch_size, "tokens_per_s": metrics["tokens_per_s"], "step_s": metrics["step_s"],
            "loss": metrics["loss"]}


def check_shape(shape: str, args, device: torch.device) -> dict:
    small = shape == "small"
    new_tokens, prompt_len = (12, 16) if small else (128, 128)
    loaded = dummy_model(shape, args.k, str(device))
    out = {"parameters": sum(p.numel() for p in loaded.model.parameters())}
    out["lossless_fp32"] = lossless(loaded, args.k, 16 if small else 64)
    loaded.model.to(torch.bfloat16)
    out["lossless_bf16"] = lossless(loaded, args.k, 16 if small else 64)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    bandwidth = copy_bandwidth(device, 64 if small else 4096)
    out["weight_floor_ms"] = 1000 * weight_bytes / bandwidth
    out["copy_bandwidth_gb_s"] = bandwidth / 1e9
    out["speed_bf16"] = [speed(loaded, b, args.k, new_tokens, prompt_len) for b in args.batches]
    if args.compile:
        start = time.perf_counter()
        compile_decode(loaded.model)
        out["speed_bf16_compiled"] = speed(loaded, args.batches[0], args.k, new_tokens, prompt_len)
        out["compile_and_first_run_s"] = time.perf_counter() - start
    plain_1 = out["speed_bf16"][0]["plain_ms_per_step"]
    out["plain_vs_floor_batch1"] = plain_1 / out["weight_floor_ms"]
    out["pass_cost_bf16"] = pass_costs(loaded, [1, 2, 4, 6, 8] if small else list(range(1, 33)), 64 if small else 512,
                                       reps=3 if small else 10)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dummy-weights", action="store_true", help="random Llama models at the 1B and 7B shapes (no download)")
    p.add_argument("--small", action="store_true", help="tiny shapes only: a smoke run that works on a CPU")
    p.add_argument("--shapes", default="1b,7b", help="with --dummy-weights: which shapes (of %s)" % ",".join(SHAPES))
    p.add_argument("--batches", default="1,4,16", help="batch sizes of the speed runs")
    p.add_argument("--k", type=int, default=5, help="SATs per draft")
    p.add_argument("--compile", action="store_true", help="also time the first batch size with torch.compile'd decode passes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="results/gpu_check.json", help="JSON file to write")
    args = p.parse_args(argv)
    if not (args.dummy_weights or args.small):
        p.error("give --dummy-weights (random models at real shapes) or --small (tiny shapes)")
    args.batches = [int(b) for b in args.batches.split(",")]
    shapes = ["small"] if args.small else args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    device = torch.device(args.device)
    if device.type != "cuda" and shapes != ["small"]:
        p.error(f"the {', '.join(shapes)} shapes need a GPU (device {device}); on a CPU run --small")
    started = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "k": args.k, "iteration": "two-step", "drafts": "oracle", "shapes": {}}
    for shape in shapes:
        report["shapes"][shape] = check_shape(shape, args, device)
        free(device)
    # A full step at the 1B shape (at 7B, fp32 weights, gradients and AdamW state alone are
    # 112 GB: that takes FSDP over several GPUs); the SAT adapter at the last shape checked.
    report["finetune"] = []
    row_len = 64 if args.small else 1024
    for train, strategy, shape in (("full", "fsdp", "small" if args.small else "1b"), ("sat_adapter", "ddp", shapes[-1])):
        loaded = dummy_model(shape, args.k, str(device))
        report["finetune"].append({"shape": shape, **finetune_speed(loaded, train, strategy, row_len, 2, args.k)})
        del loaded
        free(device)
    report["elapsed_s"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(summary(report), indent=2))
    return 0


def summary(report: dict) -> dict:
    """The numbers the GPU targets are about, per shape."""
    out = {}
    for shape, r in report["shapes"].items():
        first = r["speed_bf16"][0]
        out[shape] = {"lossless_fp32_equal_rows": r["lossless_fp32"]["oracle"]["equal_rows"],
                      f"speedup_batch{first['batch']}": round(first["speedup"], 2),
                      "plain_vs_floor": round(r["plain_vs_floor_batch1"], 2),
                      "pass6_vs_pass1": round(r["pass_cost_bf16"]["relative"][6], 3)}
    out["finetune_tokens_per_s"] = {f["train"]: round(f["tokens_per_s"], 1) for f in report["finetune"]}
    out["elapsed_s"] = round(report["elapsed_s"], 1)
    return out


if __name__ == "__main__":
    sys.exit(main())
