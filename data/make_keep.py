"""Writes data/keep.jsonl: general questions a pretrained model partly answers when shown a few question/answer
pairs (arithmetic, unit conversions, number facts, general knowledge), to see what fine-tuning kept.

Every computed answer is computed here; the knowledge answers are written by hand and checked once by a person.
The first five records are the demonstrations the keep set is prompted with (never scored). Deterministic:
    python data/make_keep.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

KNOWLEDGE = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Greece?", "Athens"),
    ("What is the capital of Portugal?", "Lisbon"),
    ("What is the capital of China?", "Beijing"),
    ("How many days are in a week?", "7"),
    ("How many months are in a year?", "12"),
    ("How many hours are in a day?", "24"),
    ("How many minutes are in an hour?", "60"),
    ("How many seconds are in a minute?", "60"),
    ("How many days are in a leap year?", "366"),
    ("How many days are in a common (non-leap) year?", "365"),
    ("How many legs does a spider have?", "8"),
    ("How many legs does an insect have?", "6"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a hexagon have?", "6"),
    ("How many sides does a square have?", "4"),
    ("How many sides does an octagon have?", "8"),
    ("How many continents are there on Earth?", "7"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("What is the boiling point of water at sea level in degrees Celsius?", "100"),
    ("What planet do we live on?", "Earth"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of day?", "night"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the first letter of the English alphabet?", "A"),
    ("What is the last letter of the English alphabet?", "Z"),
    ("How many letters are in the English alphabet?", "26"),
    ("How many players are on a soccer team on the field?", "11"),
    ("How many cents are in a dollar?", "100"),
    ("How many wheels does a bicycle have?", "2"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("What gas do plants take in from the air for photosynthesis?", "carbon dioxide"),
]

CONVERSIONS = [
    ("How many meters are in {n} kilometers?", lambda n: n * 1000, range(2, 10)),
    ("How many centimeters are in {n} meters?", lambda n: n * 100, range(2, 10)),
    ("How many minutes are in {n} hours?", lambda n: n * 60, range(2, 10)),
    ("How many seconds are in {n} minutes?", lambda n: n * 60, range(2, 10)),
    ("How many grams are in {n} kilograms?", lambda n: n * 1000, range(2, 10)),
    ("How many days are in {n} weeks?", lambda n: n * 7, range(2, 10)),
    ("How many eggs are in {n} dozen?", lambda n: n * 12, range(2, 10)),
    ("How many millimeters are in {n} centimeters?", lambda n: n * 10, range(2, 10)),
]


def records() -> list[dict]:
    rng = random.Random(20261206)
    out = []

    def add(category: str, prompt: str, answer) -> None:
        out.append({"prompt": prompt, "expected_answer": str(answer), "category": category})

    for prompt, answer in KNOWLEDGE:
        add("knowledge", prompt, answer)
    for template, convert, values in CONVERSIONS:
        for n in rng.sample(list(values), 4):
            add("conversion", template.format(n=n), convert(n))
    for _ in range(25):
        a, b = rng.randint(10, 60), rng.randint(10, 39)
        add("addition", f"What is {a} + {b}?", a + b)
    for _ in range(15):
        a, b = rng.randint(30, 99), rng.randint(1, 29)
        add("subtraction", f"What is {a} - {b}?", a - b)
    for _ in range(24):
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        add("multiplication", f"What is {a} times {b}?", a * b)
    for _ in range(10):
        n = rng.randint(3, 50)
        add("number_fact", f"What is double {n}?", 2 * n)
    for _ in range(8):
        n = 2 * rng.randint(2, 40)
        add("number_fact", f"What is half of {n}?", n // 2)
    for _ in range(8):
        n = rng.randint(5, 98)
        add("number_fact", f"What number comes after {n}?", n + 1)
    rng.shuffle(out)
    seen, unique = set(), []
    for record in out:
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            unique.append(record)
    return [{"id": f"keep-{k:03d}", **r, "section": "keep"} for k, r in enumerate(unique)]


def main() -> None:
    path = Path(__file__).with_name("keep.jsonl")
    lines = [json.dumps(r, ensure_ascii=False) for r in records()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{path}: {len(lines)} records")


if __name__ == "__main__":
    main()
