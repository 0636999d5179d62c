"""Checking the work: every arithmetic claim in the reasoning steps, over exact fractions, never `eval`.

A claim is a run of numbers and operators joined by `=`, as in `620 * 40 / 100 = 248`, `40% of 620 = 248`,
`2 x 3 = 6` or a chain `1.5 * 4 = 6 = 6.0`. Each pair of neighbouring sides must be equal; a side written as a
plain decimal may be rounded to the places it shows (`10 / 3 = 3.33`). Words end a run, so labels (`Distance
in 5 hours: 60 * 5 = 300`) and units (`45 km / 5 hours`) are never mistaken for operands: a side cut short
by a word (`hours * 60 = 300`) is not checked rather than wrongly flagged. A numeric final answer must equal
the last value the steps computed.

Per item: `steps_checked` (steps holding at least one claim), `steps_valid` (of those, steps whose claims all
hold), `first_bad_step` (1-based, None when none failed) and `answer_follows` (None when the answer is not a
number or nothing was computed). `work_valid` is no failed claim and no answer that does not follow.
"""

from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass
from fractions import Fraction

from tracetune.eval.score import parse_number

_TOKEN = re.compile(
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"|(?P<op>[-+*/×÷·−])|(?P<lp>\()|(?P<rp>\))|(?P<pct>%)|(?P<eq>=)"
    r"|(?P<word>[A-Za-z]+)|(?P<cur>[$€£¥])|(?P<space>\s+)|(?P<other>.)"
)
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_OPERATORS = {"+": "+", "-": "-", "−": "-", "*": "*", "×": "*", "·": "*", "/": "/", "÷": "/"}


@dataclass(frozen=True)
class StepCheck:
    steps_checked: int
    steps_valid: int
    first_bad_step: int | None
    answer_follows: bool | None
    num_claims: int

    @property
    def work_valid(self) -> bool:
        return self.first_bad_step is None and self.answer_follows is not False

    def as_row(self) -> dict:
        return {**asdict(self), "work_valid": self.work_valid}


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text) tokens; `x` between numbers is multiplication, `of` after a percentage too."""
    out: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(text):
        kind, value = match.lastgroup, match.group()
        if kind in ("space", "cur"):
            continue
        previous = out[-1][0] if out else None
        times = (value.lower() == "x" and previous in ("num", "rp")) or (value.lower() == "of" and previous == "pct")
        if kind == "word" and times:
            kind, value = "op", "*"
        out.append((kind, value))
    return out


def _runs(tokens: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Maximal stretches of arithmetic tokens holding an `=`; any word or other character ends one."""
    runs, current = [], []
    for token in tokens + [("word", "")]:
        if token[0] in ("num", "op", "lp", "rp", "pct", "eq"):
            current.append(token)
            continue
        if any(kind == "eq" for kind, _ in current):
            runs.append(current)
        current = []
    return runs


DIVIDES_BY_ZERO = object()


class _Parser:
    """Recursive descent over one side: sum := product (('+'|'-') product)*; product := unary (('*'|'/') unary)*;
    unary := '-' unary | atom; atom := number '%'? | '(' sum ')' '%'?."""

    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens, self.at = tokens, 0

    def parse(self) -> Fraction | object | None:
        """The side's value; None where it is not a whole expression; DIVIDES_BY_ZERO where it divides by 0."""
        try:
            value = self._sum()
        except (IndexError, ValueError):
            return None
        except ZeroDivisionError:
            return DIVIDES_BY_ZERO if self.at == len(self.tokens) else None
        return value if self.at == len(self.tokens) else None

    def _peek(self) -> tuple[str, str]:
        return self.tokens[self.at] if self.at < len(self.tokens) else ("end", "")

    def _sum(self) -> Fraction:
        return self._chain(self._product, "+-")

    def _product(self) -> Fraction:
        return self._chain(self._unary, "*/")

    def _chain(self, operand, operators: str) -> Fraction:
        """operand ((one of `operators`) operand)*, left to right."""
        value = operand()
        while self._peek()[0] == "op" and _OPERATORS[self._peek()[1]] in operators:
            op = _OPERATORS[self.tokens[self.at][1]]
            self.at += 1
            value = _APPLY[op](value, operand())
        return value

    def _unary(self) -> Fraction:
        if self._peek()[0] == "op" and _OPERATORS[self._peek()[1]] == "-":
            self.at += 1
            return -self._unary()
        return self._atom()

    def _atom(self) -> Fraction:
        kind, text = self.tokens[self.at]
        self.at += 1
        if kind == "num":
            value = Fraction(text.replace(",", ""))
        elif kind == "lp":
            value = self._sum()
            if self._peek()[0] != "rp":
                raise ValueError("unclosed parenthesis")
            self.at += 1
        else:
            raise ValueError(f"unexpected {text!r}")
        if self._peek()[0] == "pct":
            self.at += 1
            value /= 100
        return value


def _plain_places(side: list[tuple[str, str]]) -> int | None:
    """Decimal places shown by a side that is one plain number, else None."""
    if len(side) == 1 and side[0][0] == "num":
        return len(side[0][1].partition(".")[2])
    return None


def _equal(left: Fraction, right: Fraction, places: int | None) -> bool:
    """Exactly equal, or the plain decimal side rounds the other to the places it shows (at least one)."""
    if left == right:
        return True
    return bool(places) and abs(left - right) * 10**places <= Fraction(1, 2)


def _claims(step: str) -> tuple[list[bool], Fraction | None]:
    """Each checked claim's truth in a step, and the last value it computed."""
    results, last = [], None
    for run in _runs(_tokens(step)):
        sides, current = [], []
        for token in run + [("eq", "=")]:
            if token[0] == "eq":
                sides.append(current)
                current = []
            else:
                current.append(token)
        if sides[0] and sides[0][0][0] == "op" and sides[0][0][1] not in "-−":
            sides = sides[1:]  # cut short by a word before it (`hours * 60`): not a whole expression
        values = [_Parser(side).parse() if side else None for side in sides]
        for k in range(len(sides) - 1):
            left, right = values[k], values[k + 1]
            if left is None or right is None:
                continue
            if DIVIDES_BY_ZERO in (left, right):  # `20 / 0 = 10` is a claim, and a false one
                results.append(False)
            else:
                results.append(_equal(left, right, _plain_places(sides[k + 1])))
            if right is not DIVIDES_BY_ZERO:
                last = right
    return results, last


def check_steps(steps: list[str], answer: str | None) -> StepCheck:
    """Check every arithmetic claim in `steps`, then that a numeric `answer` is the last computed value."""
    checked = valid = num_claims = 0
    first_bad, last = None, None
    for index, step in enumerate(steps, 1):
        results, value = _claims(step)
        if not results:
            continue
        checked += 1
        num_claims += len(results)
        if all(results):
            valid += 1
        elif first_bad is None:
            first_bad = index
        last = value
    number = parse_number(answer) if answer is not None else None
    if number is None or last is None:
        return StepCheck(checked, valid, first_bad, None, num_claims)
    places = _decimal_places(answer)
    # `40%` is either the 40 of `248 / 620 * 100 = 40` or the 0.4 of `248 / 620 = 40%`.
    follows = _equal(last, number, places) or ("%" in answer and _equal(last, number / 100, places + 2))
    return StepCheck(checked, valid, first_bad, follows, num_claims)


def _decimal_places(answer: str) -> int:
    match = re.search(r"\d\.(\d+)", answer)
    return len(match.group(1)) if match else 0
