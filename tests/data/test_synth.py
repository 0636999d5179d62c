import hashlib
import json
import re
from fractions import Fraction

from tests.conftest import REPO
from tracetune.cli import main
from tracetune.data.synth import CATEGORIES, DIFFICULTIES, generate
from tracetune.data.traces import load_eval_items, load_traces, normalize_prompt

STEP = re.compile(r"^(?P<label>[^:]+): (?P<expr>[-+*/(). 0-9]+) = (?P<value>-?[0-9.]+)$")


def _exact(expr: str) -> Fraction:
    """Independent evaluator: Python's own arithmetic on Fractions of the literals."""
    return eval(re.sub(r"(\d+(?:\.\d+)?)", r"Fraction('\1')", expr), {"Fraction": Fraction})  # noqa: S307


def _solve(category: str, difficulty: str, p: dict) -> str:
    """Recompute the answer from the problem parameters, without the generator's code."""
    level = DIFFICULTIES.index(difficulty)
    if category == "arithmetic":
        total = p["a"] * p["p"] + (p["b"] * p["q"] if level else 0)
        return str(p["bill"] - total) if level == 2 else str(total)
    if category == "percentage":
        value = Fraction(p["price"] * p["pct"], 100)
        if level >= 1:
            value = p["price"] - value
        if level == 2:
            value = value * (100 + p["tax"]) / 100
        return f"{float(value):.10g}"
    if category == "unit_conversion":
        if level == 0:
            return str(p["amount"] * p["factor"])
        return str(p["km"] * 1000 + p["m"]) if level == 1 else str((p["h"] * 60 + p["mins"]) * 60)
    if category == "rate":
        speed = Fraction(p["d"], p["t"])
        value = speed if level == 0 else speed * p["t2"] + (p["extra"] if level == 2 else 0)
        return f"{float(value):.10g}"
    if category == "comparison":
        x = p["a"] + p["b"]
        y = p["c"] + p["d"] if level == 0 else p["c"] - p["d"] if level == 1 else p["c"] + 2 * p["d"]
        return p["x"] if x > y else p["y"]
    if category == "sequence":
        if "ratio" in p:
            return str(p["start"] * p["ratio"] ** 4)
        return str(p["start"] + 4 * p["diff"])
    raise AssertionError(category)


def test_every_step_and_answer_recomputes():
    for record in generate(600, seed=11):
        for step in record["steps"]:
            match = STEP.match(step["content"])
            assert match, step["content"]
            assert _exact(match["expr"]) == Fraction(match["value"]), step["content"]
        meta = record["meta"]
        assert record["final_answer"] == _solve(meta["category"], meta["difficulty"], meta["params"]), record
        if meta["category"] in ("arithmetic", "comparison"):  # their parameters are stated in the prompt
            for number in re.findall(r"\d+", json.dumps(meta["params"])):
                assert number in record["prompt"], (number, record["prompt"])


def test_bundled_files_recompute_and_match_their_manifests():
    for name in ("train", "eval"):
        path = REPO / "data" / f"{name}.jsonl"
        manifest = json.loads((REPO / "data" / f"{name}.manifest.json").read_text())
        assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest["sha256"]
        assert sum(1 for _ in path.open()) == manifest["count"]
    train = load_traces(REPO / "data" / "train.jsonl").records
    for trace in train:
        assert trace.final_answer == _solve(trace.meta["category"], trace.meta["difficulty"], trace.meta["params"])
    items = load_eval_items(REPO / "data" / "eval.jsonl").records
    assert len(items) == 200 and {i.category for i in items} == set(CATEGORIES)
    assert {i.difficulty for i in items} == set(DIFFICULTIES)
    assert not {normalize_prompt(i.prompt) for i in items} & {normalize_prompt(t.prompt) for t in train}


def test_generator_is_deterministic_and_seeded():
    assert generate(50, 3) == generate(50, 3)
    assert generate(50, 3) != generate(50, 4)


def test_bundled_files_are_reproducible_from_the_cli(tmp_path):
    assert main(["data", "synth", "--num", "1000", "--seed", "1", "-o", str(tmp_path / "train.jsonl")]) == 0
    assert (tmp_path / "train.jsonl").read_bytes() == (REPO / "data" / "train.jsonl").read_bytes()
    args = ["data", "synth", "--num", "200", "--seed", "2", "--eval", "--exclude", str(REPO / "data" / "train.jsonl")]
    assert main([*args, "-o", str(tmp_path / "eval.jsonl")]) == 0
    assert (tmp_path / "eval.jsonl").read_bytes() == (REPO / "data" / "eval.jsonl").read_bytes()


def test_synth_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "x.jsonl"
    target.write_text("keep me\n")
    assert main(["data", "synth", "--num", "3", "-o", str(target)]) == 2
    assert target.read_text() == "keep me\n" and "already exists" in capsys.readouterr().err
