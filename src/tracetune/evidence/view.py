"""`RunView`: a run directory read once, typed: what the report, the model card and `compare` read. Every path
comes from tracetune.layout; a file not (yet) written reads as empty."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tracetune.layout import BASELINE_DIRS, FINAL, KEEP_DIRS, EvalDir, RunLayout, read_json, read_jsonl, read_metrics


@dataclass
class RunView:
    path: Path
    run: dict = field(default_factory=dict)  # run.json
    config: dict = field(default_factory=dict)  # config.yaml, as written
    training: dict = field(default_factory=dict)  # training.json (sft)
    env: dict = field(default_factory=dict)  # env.json
    train: list[dict] = field(default_factory=list)  # metrics.jsonl's training lines
    val: list[dict] = field(default_factory=list)  # metrics.jsonl's validation lines
    val_accuracy: list[dict] = field(default_factory=list)  # metrics.jsonl's held-out accuracy points
    scores: dict[str, dict | None] = field(default_factory=dict)  # eval dir (baselines', final) -> scores.json
    predictions: dict[str, list[dict]] = field(default_factory=dict)  # the same, and "strongest_baseline"
    comparison: dict | None = None  # eval/comparison.json
    keep: dict | None = None  # eval/keep/comparison.json
    keep_predictions: dict[str, list[dict]] = field(default_factory=dict)  # KEEP_DIRS name -> predictions
    gates: dict | None = None  # gates.json
    rft_rounds: list[dict] = field(default_factory=list)  # rft/rounds.jsonl
    grpo_rows: list[dict] = field(default_factory=list)  # grpo/metrics.jsonl

    @property
    def final(self) -> dict | None:
        """The run's model's scores (eval/final/scores.json)."""
        return self.scores.get(FINAL)


def read_run(run_dir: Path) -> RunView:
    """Every file of `run_dir` the report, card and compare read, parsed."""
    files = RunLayout(Path(run_dir))
    train, val = read_metrics(files.path)
    comparison = read_json(files.comparison)
    strongest = comparison["baselines"][comparison["strongest_baseline"]]["dir"] if comparison else None
    evaluated = (*BASELINE_DIRS.values(), FINAL)
    return RunView(
        path=files.path,
        run=read_json(files.run) or {},
        config=_config(files.config),
        training=read_json(files.training) or {},
        env=read_json(files.env) or {},
        train=train,
        val=val,
        val_accuracy=[r for r in read_jsonl(files.metrics) if r.get("split") == "val_accuracy"],
        scores={which: read_json(files.eval(which).scores) for which in evaluated},
        predictions={which: read_jsonl(files.eval(which).predictions) for which in evaluated}
        | {"strongest_baseline": read_jsonl(EvalDir(files.path / strongest).predictions) if strongest else []},
        comparison=comparison,
        keep=read_json(files.keep_comparison),
        keep_predictions={name: read_jsonl(files.keep(sub).predictions) for name, sub in KEEP_DIRS.items()},
        gates=read_json(files.gates),
        rft_rounds=read_jsonl(files.stage("rft").rounds),
        grpo_rows=read_jsonl(files.stage("grpo").metrics),
    )


def _config(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
