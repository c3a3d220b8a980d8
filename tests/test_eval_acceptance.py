"""jobs/eval_acceptance.py: the per-family and per-kind summaries add up to the whole, and the
prompt kinds come from the prompt files."""

from __future__ import annotations

import json

from jobs.eval_acceptance import acceptance, family
from jobs.prompts import load_rows
from tests.conftest import tiny_loaded


def test_groups_add_up_to_the_total():
    loaded = tiny_loaded(k=4)
    prompts = ["def f(x):\n    return", "SELECT name FROM", "Once upon a time", "Dear team, ", "x = [1, 2"]
    kinds = ["code", "sql", "prose", "chat", "code"]
    result = acceptance(loaded, prompts, 4, 12, kinds=kinds)
    families, per_kind = result["per_family"], result["per_kind"]
    assert set(families) == {"code", "prose or chat"} and set(per_kind) == {"code", "sql", "prose", "chat"}
    assert families["code"]["prompts"] == 3 and families["prose or chat"]["prompts"] == 2 and per_kind["code"]["prompts"] == 2
    for groups in (families, per_kind):
        assert sum(g["iterations"] for g in groups.values()) == result["iterations"] > 0
        assert sum(g["new_tokens"] for g in groups.values()) == result["new_tokens"] == 5 * 12
    assert "per_family" not in acceptance(loaded, prompts[:1], 4, 4)  # no kinds, no groups


def test_families_and_kinds_from_the_prompt_files(tmp_path):
    assert [family(k) for k in ("code-edit", "shell", "sql", "prose-edit", "chat")] == ["code", "code", "code", "prose or chat", "prose or chat"]
    rows = load_rows("mixed")
    assert len(rows) == 16 and all(r["kind"] for r in rows)
    assert {family(r["kind"]) for r in rows} == {"code", "prose or chat"}
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    assert load_rows(str(tmp_path / "p.jsonl")) == [{"prompt": "a", "kind": None}]
