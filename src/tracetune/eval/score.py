"""Answer extraction and equivalence: pure functions, each rule table-tested.

Extraction: the text after the last `Answer:` (its first line); otherwise the last number in the
completion; the rule that fired is recorded. Equivalence, tried in order, first match wins:
  text        equal after lower-casing, collapsing whitespace, and dropping quotes, `**` and trailing punctuation
  number      equal as exact numbers after removing currency symbols, thousands separators and a unit
              suffix (`$31.5` == `31.5`, `150 km` == `150`, `15` == `15.0`, `3/4` == `0.75`, `1,200` == `1200`)
  boolean     yes/true/correct and no/false/incorrect
  math_verify symbolic equivalence by math-verify (`2^3` == `8`, `\\frac{1}{2}` == `0.5`), when the above fail
"""

from __future__ import annotations

import re
from fractions import Fraction

from tracetune.data.render import ANSWER_MARKER

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+"
_LAST_NUMBER = re.compile(_NUMBER)
_NUMBER_WITH_UNIT = re.compile(rf"^(?:[$€£¥]\s*)?({_NUMBER})\s*(?:[$€£¥%]|[a-z][a-z ./²³]*)?$", re.IGNORECASE)
_TRUE = {"yes", "true", "correct", "y"}
_FALSE = {"no", "false", "incorrect", "n"}


def extract_answer(completion: str) -> tuple[str | None, str]:
    """(answer, rule): rule is 'answer_marker', 'last_number' or 'none'."""
    head, marker, tail = completion.rpartition(ANSWER_MARKER)
    if marker and tail.strip():
        return tail.strip().splitlines()[0].strip(), "answer_marker"
    numbers = _LAST_NUMBER.findall(completion)
    if numbers:
        return numbers[-1], "last_number"
    return None, "none"


def normalize_text(text: str) -> str:
    text = text.replace("**", "").strip().strip("\"'`").strip()
    text = re.sub(r"[.,;:!?]+$", "", text)
    return " ".join(text.lower().split())


def parse_number(text: str) -> Fraction | None:
    """An exact number from an answer like '$1,200.50', '150 km', '3/4' or '25%'; None if it is not one."""
    match = _NUMBER_WITH_UNIT.match(normalize_text(text))
    if not match:
        return None
    token = match.group(1).replace(",", "")
    try:
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def _boolean(text: str) -> bool | None:
    word = normalize_text(text)
    return True if word in _TRUE else False if word in _FALSE else None


def _math_verify(predicted: str, expected: str) -> bool:
    from math_verify import parse, verify

    try:
        gold, answer = parse(expected), parse(predicted)
        return bool(gold and answer and verify(gold, answer))
    except Exception:  # math-verify raises many kinds on unparsable input; unparsable means not equal
        return False


def answers_match(predicted: str | None, expected: str) -> tuple[bool, str]:
    """(equal, rule): rule names the first equivalence that matched, or 'none'."""
    if predicted is None:
        return False, "none"
    if normalize_text(predicted) == normalize_text(expected):
        return True, "text"
    a, b = parse_number(predicted), parse_number(expected)
    if a is not None and b is not None:
        return a == b, "number" if a == b else "none"
    x, y = _boolean(predicted), _boolean(expected)
    if x is not None and y is not None:
        return x == y, "boolean" if x == y else "none"
    if any(ch.isdigit() for ch in expected) and _math_verify(predicted, expected):
        return True, "math_verify"
    return False, "none"
