"""Load test of a running SDSAT server: plain decoding (num_sat = 0) vs SDSAT on the same server.

    python jobs/load_test.py --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 32 \
        --max-tokens 128 [--num-sat 4] [--api-key KEY] --json results/load.json

For each mode and concurrency C, C clients send streaming greedy completions back to back
until --requests have finished. Reported per row: output tokens/s (all clients together),
time to first token (TTFT) and time per output token after the first (TPOT), p50 and p99,
mean tau (tokens per decode iteration) and errors. Plain and SDSAT alternate per concurrency
so both see the same machine state; each mode gets one warm-up request first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

from jobs.prompts import load_prompts
from jobs.report import machine_info, write_json

FALLBACK_PROMPTS = [
    "def fibonacci(n):\n",
    "def is_prime(n: int) -> bool:\n",
    "class Stack:\n    def __init__(self):\n",
    "def merge_sorted(a: list, b: list) -> list:\n",
]


@dataclass
class Outcome:
    ok: bool
    tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    tau: float | None = None
    error: str = ""


@dataclass
class Row:
    mode: str
    num_sat: int
    concurrency: int
    requests: int
    errors: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p99_s: float | None
    mean_tau: float | None
    error_samples: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(mode: str, num_sat: int, concurrency: int, outcomes: list[Outcome], wall_s: float) -> Row:
    good = [o for o in outcomes if o.ok]
    tokens = sum(o.tokens for o in good)
    ttft = [o.ttft_s for o in good if o.ttft_s is not None]
    tpot = [o.tpot_s for o in good if o.tpot_s is not None]
    taus = [o.tau for o in good if o.tau is not None]
    return Row(
        mode=mode,
        num_sat=num_sat,
        concurrency=concurrency,
        requests=len(outcomes),
        errors=len(outcomes) - len(good),
        output_tokens=tokens,
        wall_s=wall_s,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        tpot_p50_s=percentile(tpot, 50),
        tpot_p99_s=percentile(tpot, 99),
        mean_tau=statistics.fmean(taus) if taus else None,
        error_samples=sorted({o.error for o in outcomes if not o.ok})[:3],
    )


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> Outcome:
    """One streaming completion; TTFT is the first chunk with text, tokens come from usage."""
    start = time.perf_counter()
    first = None
    final = None
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Outcome(False, error=f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return Outcome(False, error=f"stream error: {event['error'].get('message', '')[:200]}")
                if first is None and event["choices"] and event["choices"][0]["text"]:
                    first = time.perf_counter()
                if event.get("usage"):
                    final = event
    except httpx.HTTPError as exc:
        return Outcome(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if final is None:
        return Outcome(False, error="stream ended without usage")
    tokens = final["usage"]["completion_tokens"]
    ttft = (first or end) - start
    tpot = (end - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return Outcome(True, tokens, ttft, tpot, (final.get("sdsat") or {}).get("tau"))


async def run_level(url: str, headers: dict, bodies: list[dict], concurrency: int) -> tuple[list[Outcome], float]:
    """Send these requests with `concurrency` clients; returns outcomes and wall time."""
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    outcomes: list[Outcome] = []
    timeout = httpx.Timeout(600.0, connect=30.0)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as http:

        async def client() -> None:
            while not queue.empty():
                outcomes.append(await one_request(http, url, queue.get_nowait()))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - start


def prompts_for(spec: str) -> list[str]:
    """builtin (a few short code prompts), else what jobs/prompts.py reads (humaneval[:N] or JSONL)."""
    return FALLBACK_PROMPTS if spec == "builtin" else load_prompts(spec)


def fetch_model(url: str, headers: dict) -> dict:
    response = httpx.get(f"{url}/v1/models", headers=headers, timeout=60)
    response.raise_for_status()
    return response.json()["data"][0]


def format_table(rows: list[Row]) -> str:
    def ms(value):
        return "-" if value is None else f"{value * 1000:.0f}"

    head = f"{'conc':>4} {'mode':<6} {'k':>2} {'tok/s':>8} {'TTFT p50/p99 ms':>16} {'TPOT p50/p99 ms':>16} {'tau':>5} {'err':>4}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tau = "-" if r.mean_tau is None else f"{r.mean_tau:.2f}"
        lines.append(
            f"{r.concurrency:>4} {r.mode:<6} {r.num_sat:>2} {r.tokens_per_s:>8.1f} "
            f"{ms(r.ttft_p50_s) + '/' + ms(r.ttft_p99_s):>16} {ms(r.tpot_p50_s) + '/' + ms(r.tpot_p99_s):>16} "
            f"{tau:>5} {r.errors:>4}"
        )
    return "\n".join(lines)


def speedups(rows: list[Row]) -> dict[int, float | None]:
    """SDSAT throughput over plain throughput, per concurrency."""
    out = {}
    for c in sorted({r.concurrency for r in rows}):
        plain = next((r for r in rows if r.concurrency == c and r.mode == "plain"), None)
        sdsat = next((r for r in rows if r.concurrency == c and r.mode == "sdsat"), None)
        out[c] = sdsat.tokens_per_s / plain.tokens_per_s if plain and sdsat and plain.tokens_per_s else None
    return out


async def run(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    card = fetch_model(args.url, headers)
    model = args.model or card["id"]
    num_sat = card.get("num_sat", 0) if args.num_sat is None else args.num_sat
    prompts = prompts_for(args.prompts)
    modes = [("plain", 0)] + ([("sdsat", num_sat)] if num_sat > 0 else [])

    def bodies(k: int, n: int) -> list[dict]:
        base = {"model": model, "max_tokens": args.max_tokens, "temperature": 0, "num_sat": k, "stream": True,
                "stream_options": {"include_usage": True}}
        return [{**base, "prompt": prompts[i % len(prompts)]} for i in range(n)]

    for _, k in modes:  # warm-up
        await run_level(args.url, headers, bodies(k, 1), 1)
    rows = []
    for concurrency in args.concurrency:
        for mode, k in modes:
            outcomes, wall = await run_level(args.url, headers, bodies(k, args.requests), concurrency)
            rows.append(summarize(mode, k, concurrency, outcomes, wall))
            print(f"  concurrency {concurrency} {mode}: {rows[-1].tokens_per_s:.1f} tok/s, {rows[-1].errors} errors",
                  file=sys.stderr)
    return {
        "url": args.url,
        "model": model,
        "max_tokens": args.max_tokens,
        "requests_per_level": args.requests,
        "prompts": args.prompts,
        "machine": machine_info(),
        "serve_command": args.serve_command,
        "num_sat": num_sat,
        "server": card,
        "results": [asdict(r) for r in rows],
        "speedup": speedups(rows),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=32, help="requests per (mode, concurrency)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request")
    p.add_argument("--num-sat", type=int, default=None, help="k for the SDSAT runs (default: the server's)")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--prompts", default="mixed", help="mixed[:N], humaneval[:N], builtin, or a JSONL file of {\"prompt\"}")
    p.add_argument("--api-key", default=None, help="Bearer key if the server requires one")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--serve-command", default=None, help="how the server was started (recorded in the JSON)")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not args.concurrency or min(args.concurrency) < 1 or args.requests < 1 or args.max_tokens < 1:
        p.error("--concurrency, --requests and --max-tokens must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    rows = [Row(**r) for r in report["results"]]
    print(format_table(rows))
    for c, x in report["speedup"].items():
        if x is not None:
            print(f"concurrency {c}: SDSAT / plain throughput = {x:.2f}x")
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
