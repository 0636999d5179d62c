"""6: bad input of every kind fails before any model or tokenizer loads, names file:line or the field, and
creates no run directory."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, TINY_CONFIG
from tracetune.cli import main

BAD_UTF8 = b'{"prompt": "caf\xe9", "final_answer": "1"}'
GOOD = {"prompt": "What is 2 + 3?", "steps": [{"i": 1, "type": "calc", "content": "2 + 3 = 5"}], "final_answer": "5"}


def _data(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    with open(path, "wb") as handle:
        for line in lines:
            handle.write(
                line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
            )
            handle.write(b"\n")
    return path


def _eval(tmp_path, rows):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# (kind, function of tmp_path -> extra overrides, text the error must contain)
CASES = [
    ("config unknown key", lambda t: ["train.batchsize=2"], "train.batchsize: unknown key; did you mean 'batch_size'?"),
    ("config wrong type", lambda t: ["train.batch_size=four"], "train.batch_size: Input should be a valid integer"),
    ("config out of range", lambda t: ["data.val_fraction=0.9"], "data.val_fraction: Input should be less than 0.5"),
    ("config bad choice", lambda t: ["train.precision=fp8"], "train.precision: Input should be"),
    ("config missing data file", lambda t: [f"data.train_file={t}/nope.jsonl"], "data.train_file: file not found"),
    (
        "malformed JSON",
        lambda t: [f"data.train_file={_data(t, [GOOD, '{oops'])}"],
        "data.jsonl:2: error: <line>: malformed JSON",
    ),
    (
        "bad UTF-8",
        lambda t: ["data.train_file=" + str(_data(t, [GOOD, BAD_UTF8]))],
        "data.jsonl:2: error: <line>: invalid UTF-8",
    ),
    (
        "missing prompt",
        lambda t: [f"data.train_file={_data(t, [GOOD, {'final_answer': '1'}])}"],
        "data.jsonl:2: error: prompt: missing",
    ),
    (
        "empty answer",
        lambda t: [f"data.train_file={_data(t, [GOOD, {**GOOD, 'final_answer': ' '}])}"],
        "data.jsonl:2: error: final_answer: is empty",
    ),
    (
        "wrong type",
        lambda t: [f"data.train_file={_data(t, [GOOD, {**GOOD, 'steps': 3}])}"],
        "data.jsonl:2: error: steps: must be a list",
    ),
    (
        "duplicate step index",
        lambda t: [f"data.train_file={_data(t, [GOOD, {**GOOD, 'steps': GOOD['steps'] * 2}])}"],
        "data.jsonl:2: error: steps.i: duplicate step indices [1]",
    ),
    (
        "non-contiguous steps",
        lambda t: [f"data.train_file={_data(t, [GOOD, {**GOOD, 'steps': [{'i': 2, 'content': 'x'}]}])}"],
        "data.jsonl:2: error: steps.i: indices [2] are not contiguous",
    ),
    (
        "duplicate ids",
        lambda t: [f"data.train_file={_data(t, [{**GOOD, 'id': 'a'}, {**GOOD, 'id': 'a', 'prompt': 'b'}])}"],
        "data.jsonl:2: error: id: duplicate id 'a' (first on line 1)",
    ),
    ("empty file", lambda t: [f"data.train_file={_data(t, [''])}"], "data.jsonl: error: <file>: file has no records"),
    (
        "eval duplicate ids",
        lambda t: [f"eval.eval_file={_eval(t, [{'id': 'x', 'prompt': 'p', 'expected_answer': '1'}] * 2)}"],
        "eval.jsonl:2: error: id: duplicate id 'x'",
    ),
    (
        "eval missing expected_answer",
        lambda t: [f"eval.eval_file={_eval(t, [{'id': 'x', 'prompt': 'p'}])}"],
        "eval.jsonl:1: error: expected_answer: missing",
    ),
    (
        "eval leaks training prompt",
        lambda t: [
            f"eval.eval_file={_eval(t, [{'id': 'x', 'prompt': 'what is 2 + 3?', 'expected_answer': '5'}])}",
            f"data.train_file={_data(t, [GOOD])}",
        ],
        "eval.jsonl:1: error: prompt: eval item 'x' leaks: normalised match of training line 1",
    ),
]


@pytest.mark.parametrize("kind,overrides,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_early_and_precisely(kind, overrides, needle, tmp_path, monkeypatch, capsys):
    import tracetune.models.sources as sources

    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(sources, "load_tokenizer", lambda *a, **k: pytest.fail("a tokenizer was loaded"))
    args = [
        "run",
        str(TINY_CONFIG),
        f"output.root={tmp_path / 'runs'}",
        "output.run_name=r",
        f"data.train_file={REPO}/data/train.jsonl",
        f"eval.eval_file={REPO}/data/eval.jsonl",
        *overrides(tmp_path),
    ]
    assert main(args) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "runs" / "r").exists()


def test_the_matrix_has_at_least_15_kinds():
    assert len(CASES) >= 15
