"""A deterministic generator of verifiable reasoning traces.

Every step is `label: expression = value`, where the value is computed from the expression by this code,
never pasted. `meta.params` holds the problem's parameters so a test can recompute every answer
independently. Same (num, seed) -> same file, on any machine.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from fractions import Fraction

GENERATOR_VERSION = "tracetune-synth/1"
CATEGORIES = ("arithmetic", "percentage", "unit_conversion", "rate", "comparison", "sequence")
DIFFICULTIES = ("easy", "medium", "hard")

NAMES = ["Ava", "Ben", "Carla", "Dev", "Elif", "Femi", "Gus", "Hana", "Ivan", "Jun", "Kemi", "Liam", "Mara", "Noor"]
ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("ticket", "tickets"), ("book", "books")]


def fmt(value: Fraction | int) -> str:
    """Render an exact number the way a person would: 12, 12.5, never 12.0."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.10g}"


class _Work:
    """Collects steps; each step's value is computed from its expression here."""

    def __init__(self):
        self.steps: list[str] = []

    def step(self, label: str, expr: str) -> Fraction:
        value = _evaluate(expr)
        self.steps.append(f"{label}: {expr} = {fmt(value)}")
        return value


def _evaluate(expr: str) -> Fraction:
    """Exact arithmetic over + - * / and parentheses, via Python's parser on Fractions."""
    import ast

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return Fraction(str(node.value))
        if isinstance(node, ast.BinOp):
            a, b = walk(node.left), walk(node.right)
            ops = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}
            if isinstance(node.op, ast.Div):
                return a / b
            return ops[type(node.op)]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError(f"unsupported expression {expr!r}")

    return walk(ast.parse(expr.replace("×", "*"), mode="eval"))


def _arithmetic(rng: random.Random, level: int):
    name = rng.choice(NAMES)
    (one, many), (one2, many2) = rng.sample(ITEMS, 2)
    a, p = rng.randint(2, 4 + 3 * level), rng.randint(2, 5 + 5 * level)
    w = _Work()
    if level == 0:
        total = w.step(f"Cost of the {many}", f"{a} * {p}")
        prompt = f"{name} buys {a} {many} at ${p} each. How many dollars does {name} spend?"
        return prompt, w, total, {"a": a, "p": p}
    b, q = rng.randint(2, 4 + 2 * level), rng.randint(2, 4 + 4 * level)
    c1 = w.step(f"Cost of the {many}", f"{a} * {p}")
    c2 = w.step(f"Cost of the {many2}", f"{b} * {q}")
    total = w.step("Total cost", f"{fmt(c1)} + {fmt(c2)}")
    params = {"a": a, "p": p, "b": b, "q": q}
    if level == 1:
        prompt = (
            f"{name} buys {a} {many} at ${p} each and {b} {many2} at ${q} each. How many dollars does {name} spend?"
        )
        return prompt, w, total, params
    bill = (int(total) // 50 + 1) * 50
    change = w.step("Change", f"{bill} - {fmt(total)}")
    prompt = (
        f"{name} buys {a} {many} at ${p} each and {b} {many2} at ${q} each, and pays with ${bill}. "
        f"How many dollars of change does {name} get?"
    )
    return prompt, w, change, {**params, "bill": bill}


def _percentage(rng: random.Random, level: int):
    price = rng.randint(2, 60 + 20 * level) * 10
    pct = rng.choice([10, 20, 25, 50, 75] if level == 0 else [5, 10, 15, 20, 25, 30, 40, 50, 60, 75])
    w = _Work()
    if level == 0:
        answer = w.step(f"{pct}% of {price}", f"{price} * {pct} / 100")
        return f"What is {pct}% of {price}?", w, answer, {"price": price, "pct": pct}
    off = w.step("Discount", f"{price} * {pct} / 100")
    sale = w.step("Sale price", f"{price} - {fmt(off)}")
    if level == 1:
        prompt = f"A jacket costs ${price} and is {pct}% off. What is the sale price in dollars?"
        return prompt, w, sale, {"price": price, "pct": pct}
    tax = rng.choice([5, 10, 20])
    added = w.step("Tax", f"{fmt(sale)} * {tax} / 100")
    final = w.step("Price with tax", f"{fmt(sale)} + {fmt(added)}")
    prompt = f"A jacket costs ${price} and is {pct}% off; then {tax}% tax is added to the sale price. What is the final price in dollars?"
    return prompt, w, final, {"price": price, "pct": pct, "tax": tax}


UNITS = [
    ("rope", "meters", "centimeters", 100),
    ("bag", "kilograms", "grams", 1000),
    ("jug", "liters", "milliliters", 1000),
]


def _unit_conversion(rng: random.Random, level: int):
    w = _Work()
    if level == 0:
        thing, big, small, factor = rng.choice(UNITS)
        amount = rng.randint(2, 99)
        answer = w.step(f"{small.capitalize()}", f"{amount} * {factor}")
        prompt = f"A {thing} holds {amount} {big}. How many {small} is that?"
        return prompt, w, answer, {"amount": amount, "factor": factor}
    if level == 1:
        km, m = rng.randint(1, 30), rng.randint(1, 99) * 10
        in_m = w.step("Kilometers in meters", f"{km} * 1000")
        total = w.step("Total meters", f"{fmt(in_m)} + {m}")
        return f"A trail is {km} km and {m} m long. How many meters is that?", w, total, {"km": km, "m": m}
    h, mins = rng.randint(1, 9), rng.randint(1, 59)
    from_h = w.step("Minutes in the hours", f"{h} * 60")
    total_min = w.step("Total minutes", f"{fmt(from_h)} + {mins}")
    secs = w.step("Seconds", f"{fmt(total_min)} * 60")
    prompt = f"A movie lasts {h} hours and {mins} minutes. How many seconds is that?"
    return prompt, w, secs, {"h": h, "mins": mins}


def _rate(rng: random.Random, level: int):
    speed, t = rng.randint(3, 12 + 10 * level), rng.randint(2, 5)
    d = speed * t
    w = _Work()
    v = w.step("Speed in km per hour", f"{d} / {t}")
    if level == 0:
        return f"A cyclist rides {d} km in {t} hours. What is the speed in km per hour?", w, v, {"d": d, "t": t}
    t2 = rng.randint(2, 6 + level * 2)
    dist = w.step(f"Distance in {t2} hours", f"{fmt(v)} * {t2}")
    if level == 1:
        prompt = f"A car travels {d} km in {t} hours. At the same speed, how many km does it travel in {t2} hours?"
        return prompt, w, dist, {"d": d, "t": t, "t2": t2}
    extra = rng.randint(10, 60)
    total = w.step("Total distance", f"{fmt(dist)} + {extra}")
    prompt = (
        f"A train travels {d} km in {t} hours. It keeps that speed for {t2} hours and then goes {extra} km more. "
        "How many km does it travel in total?"
    )
    return prompt, w, total, {"d": d, "t": t, "t2": t2, "extra": extra}


def _comparison(rng: random.Random, level: int):
    x, y = rng.sample(NAMES, 2)
    w = _Work()
    a, b = rng.randint(5, 30 + 20 * level), rng.randint(1, 20)
    c, d = rng.randint(5, 30 + 20 * level), rng.randint(1, 20)
    va = w.step(f"{x}'s marbles", f"{a} + {b}")
    if level == 0:
        vb = w.step(f"{y}'s marbles", f"{c} + {d}")
        prompt = (
            f"{x} has {a} marbles and finds {b} more. {y} has {c} marbles and finds {d} more. Who has more marbles?"
        )
    else:
        vb = w.step(f"{y}'s marbles", f"{c} - {d}" if level == 1 else f"{c} + {d} * 2")
        y_text = f"gives away {d}" if level == 1 else f"finds {d} more twice"
        prompt = f"{x} has {a} marbles and finds {b} more. {y} has {c} marbles and {y_text}. Who has more marbles?"
    if va == vb:  # a tie has no answer: draw again, still deterministic in the seed
        return _comparison(rng, level)
    w.step("Difference", f"{fmt(max(va, vb))} - {fmt(min(va, vb))}")
    answer = x if va > vb else y
    return prompt, w, answer, {"x": x, "y": y, "a": a, "b": b, "c": c, "d": d}


def _sequence(rng: random.Random, level: int):
    w = _Work()
    start = rng.randint(1, 60)
    if level < 2:
        diff = rng.randint(2, 9) if level == 0 else rng.randint(11, 40)
        terms = [start + diff * k for k in range(4)]
        step = w.step("Common difference", f"{terms[1]} - {terms[0]}")
        nxt = w.step("Next term", f"{terms[-1]} + {fmt(step)}")
        params = {"start": start, "diff": diff}
    else:
        ratio = rng.randint(2, 5)
        start = rng.randint(1, 12)
        terms = [start * ratio**k for k in range(4)]
        step = w.step("Common ratio", f"{terms[1]} / {terms[0]}")
        nxt = w.step("Next term", f"{terms[-1]} * {fmt(step)}")
        params = {"start": start, "ratio": ratio}
    return f"What is the next number in the sequence {', '.join(map(str, terms))}, ...?", w, nxt, params


GENERATORS: dict[str, Callable] = {
    "arithmetic": _arithmetic,
    "percentage": _percentage,
    "unit_conversion": _unit_conversion,
    "rate": _rate,
    "comparison": _comparison,
    "sequence": _sequence,
}


def generate(num: int, seed: int, exclude_prompts: set[str] | None = None, id_prefix: str = "synth") -> list[dict]:
    """`num` native trace records, deterministic in (num, seed), with prompts not in `exclude_prompts`."""
    from tracetune.data.traces import TRACE_VERSION, normalize_prompt

    rng = random.Random(seed)
    seen = {normalize_prompt(p) for p in exclude_prompts or ()}
    records = []
    for _ in range(100 * num):
        if len(records) == num:
            break
        n = len(records)
        category = CATEGORIES[n % len(CATEGORIES)]
        level = rng.randrange(3)
        prompt, work, answer, params = GENERATORS[category](rng, level)
        if normalize_prompt(prompt) in seen:
            continue
        seen.add(normalize_prompt(prompt))
        records.append(
            {
                "trace_version": TRACE_VERSION,
                "id": f"{id_prefix}-{seed}-{n:05d}",
                "prompt": prompt,
                "steps": [{"i": i, "type": "calc", "content": s} for i, s in enumerate(work.steps, 1)],
                "final_answer": answer if isinstance(answer, str) else fmt(answer),
                "meta": {
                    "category": category,
                    "difficulty": DIFFICULTIES[level],
                    "params": params,
                    "generator": GENERATOR_VERSION,
                },
            }
        )
    if len(records) < num:
        raise ValueError(f"only {len(records)} distinct problems found for seed {seed}; ask for fewer")
    return records


def to_eval_item(record: dict) -> dict:
    """The eval-item form of a generated record (no steps, answer as expected_answer)."""
    return {
        "id": record["id"],
        "prompt": record["prompt"],
        "expected_answer": record["final_answer"],
        "section": "synth",
        "category": record["meta"]["category"],
        "difficulty": record["meta"]["difficulty"],
    }


_WORK_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def corrupt_one_number(record: dict, rng: random.Random) -> tuple[list[str], str]:
    """A generated trace's steps and answer with one number of the work (after a step's label) or a numeric
    answer changed to another value: the test case for the step checker (eval/steps.py)."""
    steps = [s["content"] for s in record["steps"]]
    answer = record["final_answer"]
    places = [(k, m) for k, step in enumerate(steps) for m in _WORK_NUMBER.finditer(step, step.index(":") + 1)]
    if _WORK_NUMBER.fullmatch(answer):
        places.append((len(steps), _WORK_NUMBER.fullmatch(answer)))
    k, match = rng.choice(places)
    old = new = match.group()
    while new == old:
        new = str(int(float(old)) + rng.choice([-3, -2, -1, 1, 2, 7, 10])) if "." not in old else old + "1"
    text = steps[k] if k < len(steps) else answer
    text = text[: match.start()] + new + text[match.end() :]
    if k < len(steps):
        steps[k] = text
        return steps, answer
    return steps, text
