"""Where records come from: a local JSONL, Parquet or CSV file, or a Hugging Face dataset by name.

`hf:NAME:SPLIT` or `hf:NAME:CONFIG:SPLIT` (e.g. `hf:openai/gsm8k:main:train`) goes through
`datasets.load_dataset`, which reads its own cache when the Hub is unreachable and `HF_HUB_OFFLINE=1` is set;
NAME may also be a local dataset directory. Every reader yields (row number, record) pairs, so the format
detection, adapters and file:line issues of data/traces.py apply to all of them alike. The evidence of a file
is its sha256; of a Hub dataset, its name, config, split, fingerprint and row count (`describe`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tracetune.errors import DataError, Issue

HUB = "hf:"


def is_hub(source: str | Path) -> bool:
    return str(source).startswith(HUB)


def parse_hub(source: str) -> tuple[str, str | None, str]:
    """(name, config or None, split) of `hf:NAME[:CONFIG]:SPLIT`; raises ValueError with the expected form."""
    parts = source[len(HUB) :].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(
            f"{source!r}: a Hub dataset is hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT; fix: e.g. hf:openai/gsm8k:main:train"
        )
    return parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]


def _hub_dataset(source: str):
    import datasets

    name, config, split = parse_hub(source)
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 (the library raises many kinds: say what happened and how to fix it)
        raise DataError(
            [
                Issue(
                    source,
                    0,
                    "<dataset>",
                    f"could not load {name!r} (config {config}, split {split!r}): {type(exc).__name__}: {str(exc)[:300]}",
                    "load it once where the Hub is reachable (it is then cached in ~/.cache/huggingface) and set "
                    "HF_HUB_OFFLINE=1 here, point HF_HOME at a cache that holds it, or export it to a local "
                    "JSONL/Parquet file",
                )
            ]
        ) from None


def _cell(value):
    """A CSV cell; one holding a JSON list or object (a trace's steps, say) is decoded."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    return value


def read_records(source: str | Path, issues: list[Issue], read_jsonl) -> list[tuple[int, dict]]:
    """(row number from 1, record) pairs of any source; `read_jsonl` reads a JSONL file (data/traces.py)."""
    if is_hub(source):
        return [(n, dict(row)) for n, row in enumerate(_hub_dataset(str(source)), start=1)]
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            return [(n, {k: _cell(v) for k, v in row.items()}) for n, row in enumerate(csv.DictReader(handle), 1)]
    return read_jsonl(path, issues)


def exists(source: str | Path) -> bool:
    return is_hub(source) or Path(source).is_file()


def describe(source: str | Path) -> dict:
    """What identifies a source's content: a file's sha256; a Hub dataset's name, config, split, fingerprint
    (datasets' hash of its content and processing) and number of rows."""
    if not is_hub(source):
        from tracetune.hashing import sha256_file

        return {"sha256": sha256_file(Path(source))}
    name, config, split = parse_hub(str(source))
    dataset = _hub_dataset(str(source))
    return {
        "dataset": name,
        "config": config,
        "split": split,
        "fingerprint": dataset._fingerprint,
        "num_rows": dataset.num_rows,
        "version": str(dataset.info.version) if dataset.info.version else None,
    }
