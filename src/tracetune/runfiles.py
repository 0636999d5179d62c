"""The run directory's files: JSON written one way everywhere (indented, UTF-8, a final newline), JSONL read
tolerating a torn last line."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, record) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_json(path: Path):
    """A JSON file's content, or None where it does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_jsonl(path: Path) -> list[dict]:
    """Every complete line of a JSONL file; a torn last line (a crash mid-write) is ignored; no file, no rows."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


read_predictions = read_jsonl
