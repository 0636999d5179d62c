"""The run directory's files: JSON written one way everywhere (indented, UTF-8, a final newline), JSONL read
tolerating a torn last line."""

from __future__ import annotations

import json
from pathlib import Path

# baseline name -> directory under eval/
BASELINE_DIRS = {"zero_shot": "base", "few_shot": "few_shot", "few_shot_answer": "few_shot_answer"}


KEEP_DIR = "eval/keep"  # the keep set's evaluations, relative to the run directory


def keep_model_dirs(name: str) -> dict[str, str]:
    """A trained model's keep-set evaluations -> directory under KEEP_DIR: prompted answer-only few-shot as the
    base is, and in its trained format. `name` is the model's directory under eval/ (stage_eval_dir)."""
    return {"answer_only": name, "trained_format": f"{name}_format"}


# keep-set evaluation -> directory under KEEP_DIR: the base model, and the run's model (the last stage's)
KEEP_DIRS = {"base": "base", **keep_model_dirs("final")}


def draw_dirs(baseline_dir: Path) -> list[Path]:
    """A few-shot baseline's evaluations, one per draw of demonstrations: the first draw's own directory, then
    its draw-<n>/ directories in order (those that hold predictions)."""
    extra = sorted(baseline_dir.glob("draw-*/predictions.jsonl"), key=lambda p: int(p.parent.name.split("-")[1]))
    return [baseline_dir, *(p.parent for p in extra)]


def draw_dir(baseline_dir: Path, draw: int) -> Path:
    """Where draw `draw` (0-based) of a few-shot baseline is evaluated."""
    return baseline_dir if draw == 0 else baseline_dir / f"draw-{draw + 1}"


def final_model_path(stages: list[str]) -> str:
    """The run's model, relative to the run directory: the last stage's final_model (SFT's is the run's own)."""
    return "final_model" if stages[-1] == "sft" else f"{stages[-1]}/final_model"


def run_dir_of_model(model: str | Path) -> Path | None:
    """The run directory a model directory belongs to (RUN/final_model, RUN/<stage>/final_model), or None."""
    path = Path(model)
    for parent in (path.parent, path.parent.parent):
        if path.is_dir() and (parent / "config.yaml").is_file() and (parent / "run.json").is_file():
            return parent
    return None


def stage_eval_dir(stages: list[str], stage: str) -> str:
    """The directory under eval/ that scores a stage's model: the last stage's is the run's final model."""
    return "final" if stage == stages[-1] else stage


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


def append_jsonl(path: Path, record: dict) -> None:
    """One line, appended and closed: a crash leaves at most one torn last line, which readers skip."""
    with open(path, "a", encoding="utf-8", newline="\n") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def trim_torn_line(path: Path) -> None:
    """Drop a torn last line (no newline: a crash mid-write) before appending more."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def trim_jsonl(path: Path, last_step: int) -> None:
    """Keep the complete lines whose step is at most `last_step` (drops a torn line and anything later)."""
    if path.is_file():
        kept = [json.dumps(row, ensure_ascii=False) + "\n" for row in read_jsonl(path) if row["step"] <= last_step]
        path.write_text("".join(kept), encoding="utf-8", newline="\n")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, validation lines) of metrics.jsonl; skipped-step events carry no loss and are left out."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("split") != "val" and "loss" in r]
    return train, [r for r in rows if r.get("split") == "val"]
