"""The main job: serve the embedded default model with SDSAT on a local Ray and query it.

Starts a local Ray cluster and the Serve app (deployments.sdsat), waits while the replica
measures its pass costs (a few seconds, as every replica does at start), then sends the
benchmark's mixed prompts (code, code edits, shell, SQL, prose, chat) with the stock
``openai`` client, each once with drafting off (num_sat=0) and once with SDSAT, prints the
answers with speed and what was drafted and accepted, and shuts down what it started.

The one replica decodes on all but one of the cores torch would use (at least one): the
HTTP proxy, the router and the client need a core too, and OpenMP threads that share their
cores with them stall (on 2 cores, plain decoding over HTTP ran at 8 tok/s on 2 threads and
15 on 1). The ratio it prints is comparable with the bench command it prints last: the same
prompts, length, dtype and threads, without HTTP.

    python jobs/demo.py [--model default] [--dtype bfloat16] [--prompts mixed:6] [--max-tokens 128] [--threads N] [--port 8000]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time

CHAT = "What is the capital of France? Answer in one sentence."


def free_port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ask(client, model: str, prompt: str, max_tokens: int, num_sat: int | None) -> tuple[str, dict, float, int]:
    extra = {} if num_sat is None else {"num_sat": num_sat}
    start = time.perf_counter()
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra)
    elapsed = time.perf_counter() - start
    return out.choices[0].text, (out.model_extra or {}).get("sdsat") or {}, elapsed, out.usage.completion_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", default="mixed:6", help="as jobs/bench.py: mixed[:N], humaneval[:N] or a JSONL file")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads of the replica (0: one fewer than torch's default, at least 1)")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, local, loopback-only cluster

    import openai
    import ray
    import torch
    from ray import serve

    from deployments.sdsat import AppArgs, build_app
    from jobs.prompts import load_prompts

    prompts = load_prompts(args.prompts)

    threads = args.threads or max(1, torch.get_num_threads() - 1)
    port = free_port(args.port)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        print(f"starting the SDSAT app for model {args.model!r} ({args.dtype}, {threads} torch threads) on http://127.0.0.1:{port} ...")
        app_args = {"model": args.model, "dtype": args.dtype, "torch_threads": threads,
                    "cpus_per_replica": min(threads, ray.cluster_resources()["CPU"] - AppArgs.model_fields["router_cpus"].default)}
        serve.run(build_app(app_args), blocking=False)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        wait_ready(client)
        model = client.models.list().data[0].id
        print(f"serving {model}")
        ask(client, model, prompts[0], 8, None)  # warm-up
        engine = wait_measured(serve.get_deployment_handle("SDSATServer", "default"))
        costs = ", ".join(f"{n}: {r:.2f}x" for n, r in engine["pass_cost"].items()) if engine["pass_cost"] else "none"
        print(f"pass cost by query tokens (measured in {engine['calibration_s'] or 0:.1f} s): {costs}\n")

        totals = {"plain": [0, 0.0], "sdsat": [0, 0.0]}
        drafted = accepted = 0
        for prompt in prompts:
            _, _, plain_s, plain_n = ask(client, model, prompt, args.max_tokens, 0)
            text, stats, sdsat_s, sdsat_n = ask(client, model, prompt, args.max_tokens, None)
            totals["plain"][0] += plain_n
            totals["plain"][1] += plain_s
            totals["sdsat"][0] += sdsat_n
            totals["sdsat"][1] += sdsat_s
            drafted += stats.get("drafted", 0)
            accepted += stats.get("accepted", 0)
            print("=" * 72)
            print(prompt + text)
            print(f"--- SDSAT {sdsat_n / sdsat_s:.1f} tok/s vs plain {plain_n / plain_s:.1f} tok/s; " + drafts_line(stats))
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": CHAT}], max_tokens=48, temperature=0
        )
        print("=" * 72)
        print(f"chat: {CHAT}\n-> {chat.choices[0].message.content}")
        plain_tps = totals["plain"][0] / totals["plain"][1]
        sdsat_tps = totals["sdsat"][0] / totals["sdsat"][1]
        print("=" * 72)
        print(summary_line(args.dtype, plain_tps, sdsat_tps, accepted, drafted))
        print(f"(requests timed whole, prefill and HTTP included, on {engine['torch_threads']} torch thread(s); the decoder alone, "
              f"prefill timed apart: python jobs/bench.py --model {args.model} --prompts {args.prompts} "
              f"--max-new-tokens {args.max_tokens} --dtype {args.dtype} --threads {engine['torch_threads']})")
    finally:
        serve.shutdown()
        ray.shutdown()
        print("Serve and the local Ray cluster are shut down.")


def summary_line(dtype: str, plain_tps: float, sdsat_tps: float, accepted: int, drafted: int) -> str:
    """The demo's verdict. With no drafts verified there is no speed-up to claim: the two
    speeds differ by noise only, so no ratio is printed."""
    speeds = f"over HTTP, batch 1, {dtype}: plain {plain_tps:.1f} tok/s, SDSAT {sdsat_tps:.1f} tok/s"
    if drafted:
        return f"{speeds} ({sdsat_tps / plain_tps:.2f}x); {accepted} of {drafted} verified draft nodes accepted"
    return f"{speeds}; the scheduler verified no drafts: on this machine a wider pass costs more than drafts gain, so SDSAT decoded plainly"


def drafts_line(stats: dict) -> str:
    if not stats.get("drafted"):
        return "no drafts verified (plain steps: drafting did not pay)"
    return f"tau {stats.get('tau', 0):.2f} tokens per pass, {stats.get('accepted', 0)} of {stats.get('drafted', 0)} draft nodes accepted"


def wait_measured(handle, timeout_s: float = 300.0) -> dict:
    """The replica's engine snapshot once its start-up pass-cost measurement is done."""
    deadline = time.monotonic() + timeout_s
    while True:
        engine = handle.stats.remote().result()["engine"]
        if engine["calibration_s"] is not None or not engine["drafting"] or time.monotonic() > deadline:
            return engine
        time.sleep(0.5)


def wait_ready(client, timeout_s: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    url = str(client.base_url).removesuffix("/v1/").removesuffix("/v1") + "/health"
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the app did not become healthy within {timeout_s:.0f}s ({url})")


if __name__ == "__main__":
    main()
