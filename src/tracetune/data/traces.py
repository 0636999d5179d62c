"""The reasoning-trace schema, JSONL reading with file:line errors, format adapters and the train/val split.

Every record, whatever its source format, becomes a `Trace`. Problems are collected as `Issue`s (file,
line, field, what is wrong, how to fix) so a whole file is reported at once.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import get_args

from tracetune.config import TraceFormat
from tracetune.data import sources
from tracetune.data.render import parse_completion
from tracetune.errors import DataError, Issue

TRACE_VERSION = "1.0"
FORMATS = (*get_args(TraceFormat)[1:], "eval")  # the one list: the config, the CLI and the readers use it


@dataclass(frozen=True)
class Step:
    i: int
    type: str
    content: str


@dataclass(frozen=True)
class Trace:
    id: str
    prompt: str
    steps: tuple[Step, ...]
    final_answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: str
    expected_answer: str
    section: str | None = None
    category: str | None = None
    difficulty: str | None = None
    line: int = field(default=0, compare=False)


@dataclass
class LoadReport:
    """What reading one file produced: its records, detected format and every issue."""

    path: str
    format: str
    format_detected: bool
    records: list = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    num_lines: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    def raise_on_errors(self) -> None:
        if self.errors:
            raise DataError(self.errors)


# ---------------------------------------------------------------- reading


def read_jsonl(path: Path, issues: list[Issue]) -> list[tuple[int, dict]]:
    """Parse a JSONL file into (line number, object) pairs; undecodable or malformed lines become issues."""
    rows = []
    name = str(path)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                issues.append(Issue(name, number, "<line>", f"invalid UTF-8 at byte {exc.start}", "save as UTF-8"))
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                issues.append(
                    Issue(
                        name,
                        number,
                        "<line>",
                        f"malformed JSON ({exc.msg} at column {exc.colno})",
                        "one JSON object per line",
                    )
                )
                continue
            if not isinstance(obj, dict):
                issues.append(
                    Issue(
                        name,
                        number,
                        "<line>",
                        f"expected a JSON object, got {type(obj).__name__}",
                        "one JSON object per line",
                    )
                )
                continue
            rows.append((number, obj))
    return rows


def detect_format(obj: dict, default: str = "native") -> str | None:
    """Guess a record's format from its keys; `default` when only a prompt says what it is."""
    if "expected_answer" in obj:
        return "eval"
    if "final_answer" in obj or "steps" in obj or "trace_version" in obj:
        return "native"
    if "question" in obj and "answer" in obj:
        return "gsm8k"
    if "messages" in obj:
        return "chat"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "prompt" in obj:
        return default
    return None


def stable_id(prompt: str, steps: list, final_answer: str) -> str:
    """An id derived from the content, so the same record always gets the same id."""
    canonical = json.dumps([prompt, steps, final_answer], sort_keys=True, ensure_ascii=False)
    return "t-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------- adapters: source format -> native dict

_CALC = re.compile(r"<<[^>]*>>")


def _from_gsm8k(obj: dict) -> dict:
    answer = obj.get("answer")
    out = {"prompt": obj.get("question"), "id": obj.get("id"), "meta": {"source_format": "gsm8k"}}
    if not isinstance(answer, str):
        out["final_answer"] = answer
        return out
    work, sep, final = answer.rpartition("####")
    if not sep:
        work, final = answer, ""
    lines = [_CALC.sub("", ln).strip() for ln in work.splitlines()]
    out["steps"] = [{"i": n, "type": "calc", "content": ln} for n, ln in enumerate((x for x in lines if x), 1)]
    out["final_answer"] = final.strip()
    return out


def _from_completion(prompt, completion, record_id, source_format: str) -> dict:
    out = {"prompt": prompt, "id": record_id, "meta": {"source_format": source_format}}
    if not isinstance(completion, str):
        out["final_answer"] = completion
        return out
    steps, answer = parse_completion(completion)
    out["steps"] = [{"i": n, "type": "step", "content": s} for n, s in enumerate(steps, 1)]
    out["final_answer"] = answer if answer is not None else completion.strip()
    return out


def _from_chat(obj: dict) -> dict:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return {"prompt": None, "final_answer": None, "_bad": "messages must be a list of {role, content} objects"}
    last_assistant = max((n for n, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last_assistant is None:
        return {"prompt": None, "final_answer": None, "_bad": "messages has no assistant turn to learn from"}
    users = [m.get("content") for m in messages[:last_assistant] if m.get("role") in ("system", "user")]
    prompt = "\n\n".join(u for u in users if isinstance(u, str)) or None
    return _from_completion(prompt, messages[last_assistant].get("content"), obj.get("id"), "chat")


def _from_alpaca(obj: dict) -> dict:
    instruction, extra = obj.get("instruction"), obj.get("input")
    prompt = instruction
    if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
        prompt = f"{instruction}\n\n{extra}"
    return _from_completion(prompt, obj.get("output"), obj.get("id"), "alpaca")


def _from_eval(obj: dict) -> dict:
    out = {k: obj.get(k) for k in ("id", "prompt")}
    out["final_answer"] = obj.get("expected_answer")
    out["meta"] = {k: obj[k] for k in ("section", "category", "difficulty") if k in obj}
    return out


ADAPTERS = {"native": dict, "gsm8k": _from_gsm8k, "chat": _from_chat, "alpaca": _from_alpaca, "eval": _from_eval}
assert set(ADAPTERS) == set(FORMATS), "every format has an adapter"


# ---------------------------------------------------------------- validation of one native record


def _check_text(rec: dict, key: str, label: str, path: str, line: int, issues: list[Issue]) -> str | None:
    value = rec.get(key)
    if value is None:
        issues.append(Issue(path, line, label, "missing", f"add a non-empty string '{label}'"))
    elif not isinstance(value, str):
        issues.append(Issue(path, line, label, f"must be a string, got {type(value).__name__}", "quote the value"))
    elif not value.strip():
        issues.append(Issue(path, line, label, "is empty", f"give a non-empty '{label}' or remove the record"))
    else:
        return value
    return None


def _check_steps(steps, path: str, line: int, issues: list[Issue]) -> tuple[Step, ...] | None:
    if steps is None:
        return ()
    if not isinstance(steps, list):
        issues.append(Issue(path, line, "steps", f"must be a list, got {type(steps).__name__}", "use [] for no steps"))
        return None
    out, before = [], len(issues)
    for n, step in enumerate(steps):
        where = f"steps[{n}]"
        if not isinstance(step, dict):
            issues.append(
                Issue(path, line, where, "must be an object", 'write {"i": 1, "type": "calc", "content": "..."}')
            )
            continue
        i, kind, content = step.get("i"), step.get("type", "step"), step.get("content")
        if not isinstance(i, int) or isinstance(i, bool):
            issues.append(
                Issue(path, line, f"{where}.i", f"must be an integer, got {i!r}", "number steps 1, 2, 3, ...")
            )
        elif not isinstance(kind, str):
            issues.append(Issue(path, line, f"{where}.type", f"must be a string, got {kind!r}", 'e.g. "calc"'))
        elif not isinstance(content, str) or not content.strip():
            issues.append(Issue(path, line, f"{where}.content", "missing or empty", "give the step's text"))
        else:
            out.append(Step(i, kind, content.strip()))
    if len(issues) > before:
        return None
    indices = [s.i for s in out]
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        issues.append(
            Issue(path, line, "steps.i", f"duplicate step indices {duplicates}", "give each step its own index")
        )
        return None
    start = indices[0] if indices else 1
    if indices and (start not in (0, 1) or indices != list(range(start, start + len(indices)))):
        issues.append(
            Issue(
                path,
                line,
                "steps.i",
                f"indices {indices} are not contiguous from 0 or 1",
                "number steps 1, 2, 3, ... in order",
            )
        )
        return None
    return tuple(out)


def _to_trace(rec: dict, path: str, line: int, issues: list[Issue]) -> Trace | None:
    before = len(issues)
    if "_bad" in rec:
        issues.append(Issue(path, line, "messages", rec["_bad"], "see the chat format in the README"))
        return None
    version = rec.get("trace_version", TRACE_VERSION)
    if version != TRACE_VERSION:
        issues.append(Issue(path, line, "trace_version", f"unsupported version {version!r}", f'use "{TRACE_VERSION}"'))
    prompt = _check_text(rec, "prompt", "prompt", path, line, issues)
    answer = _check_text(rec, "final_answer", "final_answer", path, line, issues)
    steps = _check_steps(rec.get("steps"), path, line, issues)
    record_id, meta = rec.get("id"), rec.get("meta") or {}
    if record_id is not None and not isinstance(record_id, str | int):
        issues.append(Issue(path, line, "id", f"must be a string, got {type(record_id).__name__}", "quote the id"))
    if not isinstance(meta, dict):
        issues.append(Issue(path, line, "meta", f"must be an object, got {type(meta).__name__}", "use {} or remove it"))
    if len(issues) > before:
        return None
    if record_id is None:
        record_id = stable_id(prompt, [[s.i, s.type, s.content] for s in steps], answer)
    return Trace(str(record_id), prompt.strip(), steps, answer.strip(), meta, line)


# ---------------------------------------------------------------- whole files


def load_traces(path: str | Path, fmt: str = "auto", default_format: str = "native") -> LoadReport:
    """Read, adapt and validate training traces from a file (JSONL, Parquet, CSV) or a Hub dataset
    (`hf:NAME[:CONFIG]:SPLIT`, data/sources.py); the report lists every issue."""
    name = str(path)
    report = LoadReport(name, fmt, fmt == "auto")
    if not sources.exists(path):
        report.issues.append(Issue(name, 0, "<file>", "not found", "check the path"))
        return report
    rows = sources.read_records(path, report.issues, read_jsonl)
    if not rows:  # empty, or no line parsed: the issues say which
        if not report.issues:
            report.issues.append(Issue(name, 0, "<file>", "file has no records", "add one JSON object per line"))
        return report
    if fmt == "auto":
        detected = detect_format(rows[0][1], default_format)
        if detected is None:
            report.issues.append(
                Issue(
                    name,
                    rows[0][0],
                    "<record>",
                    f"cannot tell the format from keys {sorted(rows[0][1])}",
                    "set data.format",
                )
            )
            return report
        report.format = detected
        report.notes.append(f"format: {detected} (auto-detected from line {rows[0][0]})")
    else:
        report.notes.append(f"format: {fmt} (from config)")
    adapt = ADAPTERS[report.format]
    first_line_of_id: dict[str, int] = {}
    seen_content: Counter = Counter()
    for line, obj in rows:
        trace = _to_trace(adapt(obj), name, line, report.issues)
        if trace is None:
            continue
        explicit_id = obj.get("id") is not None
        if trace.id in first_line_of_id and not explicit_id:
            # A derived id repeats only for an exact duplicate record: the n-th copy gets "-n", so every record
            # has its own id by construction (RFT's samples and the split are keyed by it).
            copy = seen_content[(trace.prompt, trace.steps, trace.final_answer)] + 1
            while f"{trace.id}-{copy}" in first_line_of_id:
                copy += 1
            trace = replace(trace, id=f"{trace.id}-{copy}")
        if trace.id in first_line_of_id:
            if explicit_id:
                report.issues.append(
                    Issue(
                        name,
                        line,
                        "id",
                        f"duplicate id {trace.id!r} (first on line {first_line_of_id[trace.id]})",
                        "make ids unique",
                    )
                )
                continue
        else:
            first_line_of_id[trace.id] = line
        seen_content[(trace.prompt, trace.steps, trace.final_answer)] += 1
        report.records.append(trace)
    report.num_lines = len(rows)
    num_duplicates = sum(c - 1 for c in seen_content.values() if c > 1)
    if num_duplicates:
        report.issues.append(
            Issue(
                name, 0, "<records>", f"{num_duplicates} exact duplicate record(s)", "deduplicate the file", "warning"
            )
        )
    return report


def load_eval_items(path: str | Path, fmt: str = "auto") -> LoadReport:
    """Read eval items: the eval format, or any trace format whose final answer becomes expected_answer."""
    report = load_traces(path, fmt, default_format="eval")
    items = []
    for trace in report.records:
        meta = trace.meta
        items.append(
            EvalItem(
                trace.id,
                trace.prompt,
                trace.final_answer,
                meta.get("section"),
                meta.get("category"),
                meta.get("difficulty"),
                trace.line,
            )
        )
    report.records = items
    if report.format == "eval":
        report.issues = [_rename_answer_field(i) for i in report.issues]
    return report


def _rename_answer_field(issue: Issue) -> Issue:
    if issue.field != "final_answer":
        return issue
    return Issue(
        issue.path,
        issue.line,
        "expected_answer",
        issue.problem,
        issue.fix.replace("final_answer", "expected_answer"),
        issue.severity,
    )


def normalize_prompt(text: str) -> str:
    """Case- and whitespace-insensitive form used for leakage checks."""
    return " ".join(text.lower().split())


def find_leakage(train: list[Trace], items: list[EvalItem], eval_path: str) -> list[Issue]:
    """Eval prompts that also occur in the training data, exactly or after normalising case and whitespace."""
    exact = {t.prompt: t for t in train}
    normal = {normalize_prompt(t.prompt): t for t in train}
    issues = []
    for item in items:
        hit, how = exact.get(item.prompt), "exact"
        if hit is None:
            hit, how = normal.get(normalize_prompt(item.prompt)), "normalised"
        if hit is not None:
            issues.append(
                Issue(
                    eval_path,
                    item.line,
                    "prompt",
                    f"eval item {item.id!r} leaks: {how} match of training line {hit.line}",
                    "remove it from one of the files",
                )
            )
    return issues


def split_train_val(traces: list[Trace], val_fraction: float, seed: int) -> tuple[list[Trace], list[Trace]]:
    """Split by a seeded hash of each id, so adding records never moves the others."""
    train, val = [], []
    for trace in traces:
        digest = hashlib.sha256(f"{seed}:{trace.id}".encode()).digest()
        share = int.from_bytes(digest[:8], "big") / 2**64
        (val if share < val_fraction else train).append(trace)
    return train, val
