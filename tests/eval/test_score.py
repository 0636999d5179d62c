import pytest

from tracetune.eval.score import answers_match, extract_answer, normalize_text, parse_number

EXTRACT = [
    ("Reasoning:\n1. 2 + 3 = 5\nAnswer: 5", "5", "answer_marker"),
    ("Answer: 4\nwait\nAnswer: 5.", "5.", "answer_marker"),
    ("Answer: 12 apples\nmore text", "12 apples", "answer_marker"),
    ("I think it is 40, no 42", "42", "last_number"),
    ("The total is $1,250.50 today", "1,250.50", "last_number"),
    ("no digits at all", None, "none"),
    ("Answer:   ", None, "none"),
]


@pytest.mark.parametrize("text,answer,rule", EXTRACT)
def test_extract_answer(text, answer, rule):
    assert extract_answer(text) == (answer, rule)


MATCH = [
    # (predicted, expected, equal, rule)
    ("Mara", "mara", True, "text"),
    ("  Mara  ", "Mara", True, "text"),
    ("Mara.", "Mara", True, "text"),
    ("**Mara**", "Mara", True, "text"),
    ("'Ben'", "Ben", True, "text"),
    ("Ben", "Mara", False, "none"),
    ("$31.5", "31.5", True, "number"),
    ("31.50", "31.5", True, "number"),
    ("150 km", "150", True, "number"),
    ("12 apples", "12", True, "number"),
    ("15", "15.0", True, "number"),
    ("3/4", "0.75", True, "number"),
    ("1,200", "1200", True, "number"),
    ("€1,200.00", "1200", True, "number"),
    ("25%", "25", True, "number"),
    ("-7", "-7.0", True, "number"),
    ("14", "15", False, "none"),
    ("yes", "true", True, "boolean"),
    ("No.", "false", True, "boolean"),
    ("yes", "no", False, "none"),
    ("2^3", "8", True, "math_verify"),
    ("\\frac{1}{2}", "0.5", True, "math_verify"),
    (None, "5", False, "none"),
]


@pytest.mark.parametrize("predicted,expected,equal,rule", MATCH)
def test_answers_match(predicted, expected, equal, rule):
    assert answers_match(predicted, expected) == (equal, rule)


@pytest.mark.parametrize(
    "text,value",
    [
        ("12", 12),
        ("12.5", 12.5),
        ("$3", 3),
        ("1,000,000", 1000000),
        ("7 km/h", 7),
        ("1/3", 1 / 3),
        ("abc", None),
        ("12 and 13", None),
    ],
)
def test_parse_number(text, value):
    got = parse_number(text)
    assert (got is None) if value is None else float(got) == pytest.approx(value)


def test_normalize_text():
    assert normalize_text("  Hello   World!! ") == "hello world"
