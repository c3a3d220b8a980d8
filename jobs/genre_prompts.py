"""Write distillation prompts in the genres the shipped artifact's data lacks.

    python jobs/genre_prompts.py [--out configs/data/genre_prompts.json] [--count 384]
    python jobs/genre_prompts.py --out configs/data/genre_prompts_more.json --skip 384 --count 627

The shipped artifact distils Python standard-library code and chat instructions
(configs/data/artifact_prompts.json, configs/data/chat_prompts.json). These prompts start
raw text in other genres: SQL, JavaScript, shell scripts and Makefiles, C, Markdown and prose
to continue, plus chat requests for emails, summaries and SQL. Built from fixed templates and
topics (no download) and saved as token ids; the base model's greedy continuations become
training rows. The benchmark prompts (jobs/data/mixed_prompts.jsonl) are not among them, and
a test checks that.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from jobs.chat_prompts import CODE_TOPICS, TOPICS, chat_prompt

TABLES = (
    ("employees", "id, name, department, salary, hired_at"),
    ("books", "id, title, author, year, price"),
    ("sensors", "id, location, reading, recorded_at"),
    ("students", "id, name, grade, school_id"),
    ("flights", "id, origin, destination, departs_at, seats"),
    ("invoices", "id, client, amount, due_date, paid"),
    ("songs", "id, title, artist, duration_s, plays"),
    ("tickets", "id, title, status, priority, opened_at"),
)
SQL_TASKS = (
    "-- Schema: {table}({cols})\n-- The ten most recent rows\nSELECT",
    "-- Schema: {table}({cols})\n-- Count the rows per {first}\nSELECT",
    "-- Create the table {table} with columns {cols}, a primary key and sensible types.\nCREATE TABLE",
    "-- Schema: {table}({cols})\n-- Delete duplicate rows, keeping the lowest id\n",
    "-- Add an index to {table} for lookups by {first}, then show a query that uses it.\n",
)
JS_TASKS = (
    "// {t}\nfunction {name}(",
    "// A small helper module: {t}\nexport function {name}(",
    "/**\n * {T}.\n */\nconst {name} = (",
)
SHELL_TASKS = (
    "#!/usr/bin/env bash\n# {T}.\nset -euo pipefail\n",
    "#!/bin/sh\n# Usage: ./{name}.sh FILE...\n# {T} for each file given.\n",
    "# Makefile for {topic}: build, test and install targets\nCC ?= cc\n",
)
C_TASKS = (
    "/* {T}. */\n#include <stdio.h>\n#include <stdlib.h>\n\n",
    "#include <string.h>\n\n/* {T}; returns 0 on success. */\nint {name}(",
)
PROSE_TASKS = (
    "{Topic} has a long history. It",
    "Most people know a little about {topic}, but few realise that",
    "In this essay I will argue that {topic}",
    "# {Topic}\n\nThis guide explains",
    "Notes on {topic}\n\n1.",
    "Dear editor,\n\nI am writing about {topic} because",
)
CHAT_TASKS = (
    "Write a short email to a colleague about {topic}.",
    "Summarize in three bullet points why {topic} matters.",
    "Fix the grammar of this sentence and repeat it: {topic} are something that everyone have an opinion about.",
    "Write an SQL query over a table {table}({cols}) that lists the rows with the highest {last}.",
)


def _name(text: str) -> str:
    words = [w for w in text.replace("-", " ").split() if w.isalpha()][:3]
    return words[0].lower() + "".join(w.capitalize() for w in words[1:]) if words else "helper"


def texts(seed: int = 0) -> list[tuple[str, bool]]:
    """Every prompt as (text, is_chat), in a fixed order."""
    out: list[tuple[str, bool]] = []
    for table, cols in TABLES:
        names = [c.strip() for c in cols.split(",")]
        out += [(task.format(table=table, cols=cols, first=names[1], last=names[-1]), False) for task in SQL_TASKS]
    for t in CODE_TOPICS:
        fields = {"t": t.capitalize(), "T": t.capitalize(), "name": _name(t), "topic": t}
        out += [(task.format(**fields), False) for task in JS_TASKS + SHELL_TASKS + C_TASKS]
    for topic in TOPICS:
        out += [(task.format(topic=topic, Topic=topic[0].upper() + topic[1:]), False) for task in PROSE_TASKS]
    rng = random.Random(seed)
    for topic in TOPICS:
        table, cols = rng.choice(TABLES)
        task = rng.choice(CHAT_TASKS)
        out.append((task.format(topic=topic, table=table, cols=cols, last=cols.split(",")[-1].strip()), True))
    return list(dict.fromkeys(out))  # the SQL request names no topic: drop its repeats


def prompts(tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` distinct prompts as token ids, the genres shuffled together."""
    pool = texts(seed)
    random.Random(seed).shuffle(pool)
    if count > len(pool):
        raise ValueError(f"count={count} exceeds the {len(pool)} distinct prompts")
    return [list(map(int, chat_prompt(tokenizer, text))) if chat else tokenizer.encode(text) for text, chat in pool[:count]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="configs/data/genre_prompts.json")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N (those of an earlier, smaller file: the list is a fixed order, so --skip 512 --count 1000 gives prompts 512..999)")
    parser.add_argument("--count", type=int, default=384)
    args = parser.parse_args(argv)
    from sdsat.model.load import load_model

    found = prompts(load_model("default-base").tokenizer, args.count)[args.skip :]
    Path(args.out).write_text("[\n" + ",\n".join(json.dumps(p, separators=(",", ":")) for p in found) + "\n]\n")
    print(f"{len(found)} prompts written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
