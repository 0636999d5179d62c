import json

import pytest

from tests.conftest import write_jsonl
from tracetune.cli import main
from tracetune.data.traces import (
    find_leakage,
    load_eval_items,
    load_traces,
    split_train_val,
    stable_id,
)

GOOD = {
    "trace_version": "1.0",
    "prompt": "What is 2 + 3?",
    "steps": [{"i": 1, "type": "calc", "content": "2 + 3 = 5"}],
    "final_answer": "5",
    "meta": {},
}

# One bad line of each kind: (line text, field named in the error, words in the problem)
BAD_LINES = [
    ('{"prompt": "x", "final_answer": ', "<line>", "malformed JSON"),
    (b'{"prompt": "caf\xe9", "final_answer": "1"}', "<line>", "invalid UTF-8"),
    ('{"final_answer": "1", "steps": []}', "prompt", "missing"),
    ('{"prompt": "   ", "final_answer": "1"}', "prompt", "is empty"),
    ('{"prompt": "q", "final_answer": ""}', "final_answer", "is empty"),
    ('{"prompt": "q", "steps": []}', "final_answer", "missing"),
    ('{"prompt": 7, "final_answer": "1"}', "prompt", "must be a string"),
    ('{"prompt": "q", "final_answer": "1", "steps": "none"}', "steps", "must be a list"),
    (
        '{"prompt": "q", "final_answer": "1", "steps": [{"i": "one", "content": "a"}]}',
        "steps[0].i",
        "must be an integer",
    ),
    (
        '{"prompt": "q", "final_answer": "1", "steps": [{"i": 1, "content": "a"}, {"i": 1, "content": "b"}]}',
        "steps.i",
        "duplicate step indices",
    ),
    (
        '{"prompt": "q", "final_answer": "1", "steps": [{"i": 1, "content": "a"}, {"i": 3, "content": "b"}]}',
        "steps.i",
        "not contiguous",
    ),
    (
        '{"prompt": "q", "final_answer": "1", "steps": [{"i": 1, "content": ""}]}',
        "steps[0].content",
        "missing or empty",
    ),
    ('{"prompt": "q", "final_answer": "1", "trace_version": "9"}', "trace_version", "unsupported version"),
    ("[1, 2]", "<line>", "expected a JSON object"),
]


def _write_bad_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as handle:
        handle.write((json.dumps({**GOOD, "id": "a"}) + "\n").encode())
        for line, _, _ in BAD_LINES:
            handle.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
        handle.write((json.dumps({**GOOD, "id": "a", "prompt": "other"}) + "\n").encode())  # duplicate explicit id
    return path


def test_each_bad_line_gets_one_precise_error(tmp_path):
    report = load_traces(_write_bad_file(tmp_path))
    errors = {e.line: e for e in report.errors}
    assert len(report.errors) == len(BAD_LINES) + 1
    for offset, (_, field, words) in enumerate(BAD_LINES):
        error = errors[offset + 2]
        assert error.field == field and words in error.problem, (offset + 2, str(error))
        assert error.fix and str(error).startswith(f"{report.path}:{offset + 2}: error: {field}: ")
    dup = errors[len(BAD_LINES) + 2]
    assert dup.field == "id" and "duplicate id 'a' (first on line 1)" in dup.problem
    assert [t.id for t in report.records] == ["a"]


def test_data_validate_cli_prints_one_error_per_bad_line_and_exits_1(tmp_path, capsys):
    path = _write_bad_file(tmp_path)
    assert main(["data", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    error_lines = [ln for ln in out.splitlines() if ": error: " in ln]
    assert len(error_lines) == len(BAD_LINES) + 1
    assert sorted(int(ln.split(":")[1]) for ln in error_lines) == list(range(2, len(BAD_LINES) + 3))


def test_valid_file_exits_0(capsys):
    assert main(["data", "validate", "data/train.jsonl"]) == 0
    assert "1000 valid record(s), 0 error(s)" in capsys.readouterr().out


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    report = load_traces(path)
    assert [e.problem for e in report.errors] == ["file has no records"]


def test_file_where_no_line_parses_reports_each_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{not json\n["a list"]\n', encoding="utf-8")
    report = load_traces(path)
    assert [(e.line, e.field) for e in report.errors] == [(1, "<line>"), (2, "<line>")] and report.records == []


def test_exact_duplicates_are_a_counted_warning(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, GOOD, {**GOOD, "prompt": "x"}])
    report = load_traces(path)
    assert not report.errors and len(report.records) == 4
    assert [w.problem for w in report.warnings] == ["2 exact duplicate record(s)"]
    first, *copies = [r.id for r in report.records[:3]]
    assert copies == [f"{first}-2", f"{first}-3"]  # every record has its own id, by construction


def test_stable_id_is_derived_from_content(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    first = load_traces(path).records[0].id
    assert first == stable_id("What is 2 + 3?", [[1, "calc", "2 + 3 = 5"]], "5") and first.startswith("t-")
    assert load_traces(path).records[0].id == first


def test_gsm8k_adapter_strips_calculator_annotations(tmp_path):
    row = {
        "question": "Natalia sold 48 clips. Half as many in May. Total?",
        "answer": "She sold 48/2 = <<48/2=24>>24 in May.\nTotal 48+24 = <<48+24=72>>72.\n#### 72",
    }
    report = load_traces(write_jsonl(tmp_path / "g.jsonl", [row]))
    assert report.format == "gsm8k" and "auto-detected" in report.notes[0]
    trace = report.records[0]
    assert [s.content for s in trace.steps] == ["She sold 48/2 = 24 in May.", "Total 48+24 = 72."]
    assert trace.final_answer == "72"


def test_chat_adapter(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "Reasoning:\n1. 2 + 2 = 4\nAnswer: 4"},
        ]
    }
    trace = load_traces(write_jsonl(tmp_path / "c.jsonl", [row])).records[0]
    assert (
        trace.prompt == "Be brief.\n\n2+2?"
        and [s.content for s in trace.steps] == ["2 + 2 = 4"]
        and trace.final_answer == "4"
    )
    bad = load_traces(write_jsonl(tmp_path / "c2.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]))
    assert bad.errors[0].field == "messages" and "no assistant turn" in bad.errors[0].problem


def test_alpaca_adapter(tmp_path):
    row = {"instruction": "Add the numbers.", "input": "2 and 5", "output": "7"}
    trace = load_traces(write_jsonl(tmp_path / "a.jsonl", [row])).records[0]
    assert trace.prompt == "Add the numbers.\n\n2 and 5" and trace.final_answer == "7" and trace.steps == ()


def test_explicit_format_overrides_detection(tmp_path):
    report = load_traces(write_jsonl(tmp_path / "a.jsonl", [GOOD]), "native")
    assert report.notes == ["format: native (from config)"]


def test_eval_items_duplicate_ids_and_missing_expected_answer(tmp_path):
    rows = [
        {"id": "e1", "prompt": "p1", "expected_answer": "1", "category": "c"},
        {"id": "e1", "prompt": "p2", "expected_answer": "2"},
        {"id": "e3", "prompt": "p3", "expected_answer": None},
    ]
    report = load_eval_items(write_jsonl(tmp_path / "e.jsonl", rows))
    fields = sorted((e.line, e.field) for e in report.errors)
    assert fields == [(2, "id"), (3, "expected_answer")]
    assert report.records[0].category == "c"


def test_leakage_exact_and_normalised(tmp_path):
    train = load_traces(write_jsonl(tmp_path / "t.jsonl", [GOOD, {**GOOD, "prompt": "Other question here"}])).records
    items = load_eval_items(
        write_jsonl(
            tmp_path / "e.jsonl",
            [
                {"id": "x", "prompt": "What is 2 + 3?", "expected_answer": "5"},
                {"id": "y", "prompt": "  other   QUESTION here ", "expected_answer": "5"},
                {"id": "z", "prompt": "fresh", "expected_answer": "5"},
            ],
        )
    ).records
    issues = find_leakage(train, items, "e.jsonl")
    assert [(i.line, "exact" in i.problem) for i in issues] == [(1, True), (2, False)]
    assert "normalised match of training line 2" in issues[1].problem


def test_split_is_stable_when_records_are_added():
    records = load_traces("data/train.jsonl").records
    _, val_small = split_train_val(records[:500], 0.1, seed=3)
    _, val_big = split_train_val(records, 0.1, seed=3)
    assert {t.id for t in val_small} == {t.id for t in val_big if t in records[:500]}
    assert 0.05 < len(val_big) / len(records) < 0.15
    _, other_seed = split_train_val(records, 0.1, seed=4)
    assert {t.id for t in other_seed} != {t.id for t in val_big}


@pytest.mark.parametrize("fmt", ["native", "gsm8k", "chat", "alpaca", "eval"])
def test_readme_examples_of_each_format_load(fmt, tmp_path):
    from tests.conftest import REPO

    text = (REPO / "README.md").read_text(encoding="utf-8")
    marker = f"<!-- example:{fmt} -->"
    assert marker in text, f"README lacks the {fmt} example"
    line = text.split(marker, 1)[1].split("```json\n", 1)[1].split("\n```", 1)[0]
    path = tmp_path / "x.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    report = load_traces(path)
    assert report.format == fmt and not report.errors
