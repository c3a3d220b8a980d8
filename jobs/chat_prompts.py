"""Write the chat half of the shipped artifact's distillation prompts.

    python jobs/chat_prompts.py [--out configs/data/chat_prompts.json] [--count 512]
    python jobs/chat_prompts.py --out configs/data/chat_prompts_more.json --skip 512 --count 1072
    python jobs/chat_prompts.py --topics second --out configs/data/chat_prompts_second.json --count 1040
    python jobs/chat_prompts.py --topics third --out configs/data/chat_prompts_third.json --count 1040

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

# A second pool, disjoint from the first (the first is used up by chat_prompts.json and
# chat_prompts_more.json): the same tasks over other topics.
SECOND_TOPICS = (
    "rivers", "the Industrial Revolution", "vitamins", "wind turbines", "penguins", "opera",
    "the Silk Road", "antibiotics", "tides", "skyscrapers", "paper making", "comets",
    "bicycles", "chocolate", "migration of birds", "the Great Wall of China", "quantum computing",
    "volunteering", "fungi", "lighthouses", "the Cold War", "sign language", "batteries", "caves",
    "street food", "the Amazon river", "kindness", "podcasts", "satellites", "the Mayan civilization",
    "wolves", "typography", "hurricanes", "public transport", "cheese making", "the Vikings",
    "video games", "composting", "the Pythagorean theorem", "elephants", "fire safety", "the brain",
    "hiking", "shipping containers", "the Nobel Prize", "clouds", "jellyfish", "film making",
    "the metric system", "minimalism", "ocean currents", "the Wright brothers", "spices", "bamboo",
    "first aid", "the Milky Way", "knitting", "wetlands", "recycling electronics", "the piano",
)
SECOND_CODE_TOPICS = (
    "counts the vowels in a string", "checks whether two words are anagrams", "converts a number to binary",
    "finds the second largest number in a list", "capitalizes every word of a sentence",
    "computes the average of a list of numbers", "checks whether a year is a leap year",
    "swaps the keys and values of a dictionary", "finds the common elements of two lists",
    "reverses the order of words in a sentence", "counts how often each character appears",
    "rounds a number to two decimal places", "splits a list into chunks of size n",
    "returns the n smallest numbers of a list", "removes punctuation from a string",
    "converts a list of strings to integers", "finds the longest word in a sentence",
    "checks whether a list is sorted", "sums the digits of a number", "builds a multiplication table",
)
# A third pool, disjoint from both (the second is used up by chat_prompts_second.json).
THIRD_TOPICS = (
    "the Arctic", "sourdough", "the history of writing", "tornadoes", "beekeeping", "the violin",
    "the Ottoman Empire", "dental health", "hydropower", "owls", "ballet", "the Panama Canal",
    "allergies", "geysers", "castles", "maple syrup", "butterflies", "the Inca Empire", "3D printing",
    "gratitude", "mushroom foraging", "the Eiffel Tower", "nuclear fusion", "sharks", "calligraphy",
    "thunderstorms", "the Space Station", "pottery", "the Byzantine Empire", "blood donation",
    "sailing", "the Sahara", "insomnia", "cryptography", "rice farming", "the Beatles", "tigers",
    "architecture of cathedrals", "the Moon's phases", "journaling", "coffee roasting", "sea turtles",
    "the Apollo program", "camping", "wind erosion", "the history of medicine", "puzzles",
    "the ozone layer", "container gardening", "kangaroos", "the Greek myths", "drones",
    "water purification", "the Gold Rush", "salt", "storytelling", "the solar system", "parrots",
    "electric guitars", "the Dead Sea",
)
THIRD_CODE_TOPICS = (
    "counts the consonants in a word", "converts a binary string to an integer",
    "finds all even numbers in a list", "checks whether a number is a perfect square",
    "returns the last n lines of a file", "replaces every space in a string with a dash",
    "finds the index of the smallest element of a list", "zips two lists into a dictionary",
    "computes the sum of the squares of a list", "checks whether a string has only digits",
    "removes empty strings from a list", "finds the mode of a list of numbers",
    "converts minutes to hours and minutes", "counts the uppercase letters in a string",
    "pads a number with leading zeros", "finds the difference between two dates in days",
    "interleaves two lists", "checks whether all elements of a list are equal",
    "returns a list of the words longer than five letters", "converts a dictionary to a list of pairs",
)
POOLS = {"first": (TOPICS, CODE_TOPICS), "second": (SECOND_TOPICS, SECOND_CODE_TOPICS),
         "third": (THIRD_TOPICS, THIRD_CODE_TOPICS)}


def instructions(count: int, seed: int = 0, topics: str = "first") -> list[str]:
    """``count`` distinct instructions, prose and code mixed (about 1 in 4 code), from the
    ``topics`` pool ("first", "second" or "third", disjoint)."""
    prose, code = POOLS[topics]
    pool = [task.format(t=t) for task in TASKS for t in prose] + [task.format(t=t) for task in CODE_TASKS for t in code]
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
    parser.add_argument("--topics", choices=sorted(POOLS), default="first", help="the topic pool: the pools are disjoint; first and second are used up by the earlier files")
    args = parser.parse_args(argv)
    from sdsat.model.load import load_model

    tokenizer = load_model("default-base").tokenizer
    prompts = [list(map(int, chat_prompt(tokenizer, text))) for text in instructions(args.count, topics=args.topics)[args.skip :]]
    Path(args.out).write_text("[\n" + ",\n".join(json.dumps(p, separators=(",", ":")) for p in prompts) + "\n]\n")
    print(f"{len(prompts)} chat prompts written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
