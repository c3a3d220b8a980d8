"""Writing a job's results as JSON (bench, load test, acceptance eval, tree search). No torch."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path, result: dict) -> None:
    """Write ``result`` to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
