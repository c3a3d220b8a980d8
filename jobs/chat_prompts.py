"""Write the chat half of the shipped artifact's distillation prompts.

    python jobs/chat_prompts.py [--out configs/data/chat_prompts.json] [--count 512]
    python jobs/chat_prompts.py --out configs/data/chat_prompts_more.json --skip 512 --count 1072

Instructions are built from fixed task templates and topics (no data download), rendered
with the default model's chat template up to the assistant's turn, and saved as token ids:
the base model's own greedy answers to them become training rows (self-distillation), so
the SATs see prose, lists and explanations as well as code. The benchmark prompts
(jobs/data/mixed_prompts.jsonl) are not among them, and a test checks that.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "You are a helpful assistant."
TASKS = (
    "Explain {t} to a beginner.",
    "Write a short paragraph about {t}.",
    "Give three facts about {t}.",
    "What are the pros and cons of {t}?",
    "Write a haiku about {t}.",
    "Describe {t} in simple words.",
    "List five questions a student might ask about {t}.",
    "Write a short story that involves {t}.",
    "Summarize the main ideas of {t} in a few sentences.",
    "How would you teach {t} to a ten-year-old?",
    "Write a tweet about {t}.",
    "What is a common misconception about {t}?",
    "Write a formal letter to a newspaper about {t}.",
    "Give a step-by-step guide related to {t}.",
    "Compare {t} with something similar and explain the difference.",
    "Write a product description inspired by {t}.",
)
CODE_TASKS = (
    "Write a Python function that {t}.",
    "Show how to {t} in JavaScript.",
    "Explain how to {t} in Python, with an example.",
    "Write a bash command to {t}.",
)
TOPICS = (
    "volcanoes", "the water cycle", "black holes", "the Roman Empire", "machine learning", "coffee",
    "honeybees", "climate change", "the stock market", "meditation", "electric cars", "the moon landing",
    "chess", "sleep", "renewable energy", "the human heart", "jazz music", "ancient Egypt", "recycling",
    "the internet", "rainforests", "friendship", "public libraries", "vaccines", "earthquakes",
    "bread baking", "the Olympic Games", "time management", "the French Revolution", "octopuses",
    "solar panels", "learning a language", "gardening", "democracy", "the immune system", "dinosaurs",
    "photography", "mountains", "urban planning", "social media", "the periodic table", "whales",
    "cybersecurity", "marathon running", "board games", "the Renaissance", "glaciers", "budgeting",
    "robots", "tea", "bridges", "the printing of money", "origami", "deserts", "nutrition",
    "airplanes", "the speed of light", "remote work", "coral reefs", "poetry", "trains", "museums",
)
CODE_TOPICS = (
    "reverses a string", "counts the words in a text", "checks whether a number is prime",
    "reads a CSV file and sums a column", "finds the largest element of a list",
    "removes duplicates from a list while keeping order", "converts Celsius to Fahrenheit",
    "computes the factorial of n", "sorts a list of dictionaries by a key", "validates an email address",
    "flattens a nested list", "counts lines in every file of a directory", "finds the median of numbers",
    "merges two dictionaries", "generates the Fibonacci sequence", "parses a date string",
    "downloads nothing but prints the current time", "computes the greatest common divisor",
    "checks whether a string is a palindrome", "groups words by their first letter",
)


def instructions(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct instructions, prose and code mixed (about 1 in 4 code)."""
    pool = [task.format(t=t) for task in TASKS for t in TOPICS] + [task.format(t=t) for task in CODE_TASKS for t in CODE_TOPICS]
    random.Random(seed).shuffle(pool)
    if count > len(pool):
        raise ValueError(f"count={count} exceeds the {len(pool)} distinct instructions")
    return pool[:count]


def chat_prompt(tokenizer, instruction: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="configs/data/chat_prompts.json")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N (those of an earlier, smaller file: the list is a fixed order, so --skip 512 --count 1000 gives prompts 512..999)")
    parser.add_argument("--count", type=int, default=512)
    args = parser.parse_args(argv)
    from sdsat.model.load import load_model

    tokenizer = load_model("default-base").tokenizer
    prompts = [list(map(int, chat_prompt(tokenizer, text))) for text in instructions(args.count)[args.skip :]]
    Path(args.out).write_text("[\n" + ",\n".join(json.dumps(p, separators=(",", ":")) for p in prompts) + "\n]\n")
    print(f"{len(prompts)} chat prompts written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
