"""`tracetune data validate | stats | synth`: reports printed for people, exit 1 when validation fails."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from tracetune.data import synth as synth_module
from tracetune.data.render import end_of_turn_ids, tokenize_trace
from tracetune.data.traces import find_leakage, load_eval_items, load_traces
from tracetune.errors import Issue, TracetuneError
from tracetune.layout import write_json


def _load(path: str, fmt: str, is_eval: bool):
    if is_eval or fmt == "eval":
        return load_eval_items(path, fmt)
    return load_traces(path, fmt)


def _token_lengths(report, tokenizer) -> list[int]:
    from tracetune.config import DataConfig

    end_ids = end_of_turn_ids(tokenizer)
    instruction = DataConfig.model_fields["instruction"].default
    return [len(tokenize_trace(tokenizer, t, instruction, end_ids).input_ids) for t in report.records]


def validate(path: str, fmt: str, is_eval: bool, against: str | None, tokenizer, max_len: int | None) -> int:
    """`data validate`; `tokenizer` (already loaded, or None) measures lengths against `max_len`."""
    if path is None:
        raise TracetuneError("data validate needs a FILE")
    report = _load(path, fmt, is_eval)
    issues = list(report.issues)
    if against:
        issues += find_leakage(load_traces(against).records, report.records, path)
    if max_len and tokenizer and report.records and not is_eval:
        for trace, length in zip(report.records, _token_lengths(report, tokenizer), strict=True):
            if length > max_len:
                issues.append(
                    Issue(
                        path,
                        trace.line,
                        "<record>",
                        f"{length} tokens > max_seq_length {max_len}",
                        "raise data.max_seq_length or set data.overlength_policy=drop|truncate",
                    )
                )
    for note in report.notes:
        print(note)
    for issue in sorted(issues, key=lambda i: (i.line, i.field)):
        print(issue)
    num_errors = sum(i.severity == "error" for i in issues)
    print(
        f"{path}: {len(report.records)} valid record(s), {num_errors} error(s), {len(issues) - num_errors} warning(s)"
    )
    return 1 if num_errors else 0


def _percentiles(values: list[int]) -> dict[str, int]:
    ordered = sorted(values)
    return {f"p{q}": ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] for q in (50, 90, 95, 99, 100)}


def stats(path: str, fmt: str, tokenizer, tokenizer_name: str | None) -> int:
    """`data stats`; with a loaded `tokenizer`, also token length percentiles."""
    report = load_traces(path, fmt)
    report.raise_on_errors()
    records = report.records
    categories = Counter(t.meta.get("category", "<none>") for t in records)
    steps = Counter(len(t.steps) for t in records)
    print(f"{path}: {len(records)} records; {report.notes[0]}")
    print("per category:")
    for name, count in sorted(categories.items()):
        print(f"  {name:<20} {count}")
    print("steps per record:")
    widest = max(steps.values())
    for num, count in sorted(steps.items()):
        print(f"  {num:>3} steps {count:>6} {'#' * max(1, round(40 * count / widest))}")
    if tokenizer:
        lengths = _token_lengths(report, tokenizer)
        print(f"token lengths with {tokenizer_name} (prompt + completion): {_percentiles(lengths)}")
    return 0


def synth(num: int, seed: int, output: str | None, is_eval: bool, exclude: str | None) -> int:
    if not output:
        raise TracetuneError("data synth needs -o FILE")
    out = Path(output)
    if out.exists():
        raise TracetuneError(f"{out} already exists; fix: choose a new file (nothing is overwritten)")
    excluded = {t.prompt for t in load_traces(exclude).records} if exclude else set()
    records = synth_module.generate(num, seed, excluded, "eval" if is_eval else "synth")
    if is_eval:
        records = [synth_module.to_eval_item(r) for r in records]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    manifest = {
        "file": out.name,
        "count": len(records),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "generator": synth_module.GENERATOR_VERSION,
        "seed": seed,
        "kind": "eval" if is_eval else "train",
        "excluded_prompts_from": Path(exclude).name if exclude else None,
    }
    write_json(out.with_suffix(".manifest.json"), manifest)
    print(f"wrote {len(records)} records to {out}")
    return 0
