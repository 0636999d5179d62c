"""Experiment trackers (`output.report_to`): TensorBoard, MLflow, Weights & Biases, Trackio.

metrics.jsonl stays the source of truth; a sink mirrors every line written to a run's metrics files (SFT's,
each RFT round's and rounds.jsonl, GRPO's), the resolved config at the start and the final scores at the
end. Streams are named by where the line was written and its split: `train`, `val`, `grpo`, `grpo/heldout`,
`rft/round-1`, `rft/rounds`. A sink that cannot start or fails later (not installed, not logged in, offline)
warns once and is dropped; the run goes on. Only rank 0 writes, as for every run file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tracetune.layout import ROUNDS, RunLayout

log = logging.getLogger("tracetune")

_active: list = []
_run_dir: Path | None = None


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics line, nested ones flattened with '/' (reward/mean); bools and text left out."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
            out[f"{prefix}{key}"] = float(value)
    return out


class TensorBoard:
    """Event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."""

    def __init__(self, run_dir: Path, name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(RunLayout(run_dir).tracker("tensorboard")))
        self.writer.add_text("config", "```\n" + _yaml(config) + "\n```")

    def log(self, stream: str, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{stream}/{key}", value, step)
        self.writer.flush()

    def finish(self, summary: dict[str, float]) -> None:
        for key, value in summary.items():
            self.writer.add_scalar(f"final/{key}", value, 0)
        self.writer.close()


class MLflow:
    """An MLflow run; the tracking URI is MLFLOW_TRACKING_URI where set, else a file store in RUN_DIR/mlruns."""

    def __init__(self, run_dir: Path, name: str, config: dict):
        import os

        import mlflow

        from tracetune.config import flatten

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the local file store: MLflow 3 keeps it in maintenance mode behind this opt-in
            uri = RunLayout(run_dir).tracker("mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("tracetune")
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=name)
        params = {k: str(v)[:500] for k, v in flatten(config).items()}
        mlflow.log_params(params)

    def log(self, stream: str, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({f"{stream}/{k}".replace("/", "."): v for k, v in values.items()}, step=step)

    def finish(self, summary: dict[str, float]) -> None:
        self.mlflow.log_metrics({f"final.{k}": v for k, v in summary.items()})
        self.mlflow.end_run()


class Wandb:
    """A Weights & Biases run in project `tracetune` (WANDB_MODE=offline keeps it local)."""

    def __init__(self, run_dir: Path, name: str, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="tracetune", name=name, config=config, dir=str(run_dir))  # writes RUN/wandb/

    def log(self, stream: str, step: int, values: dict[str, float]) -> None:
        self.run.log({f"{stream}/{k}": v for k, v in values.items()} | {f"{stream}/step": step})

    def finish(self, summary: dict[str, float]) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in summary.items()})
        self.run.finish()


class Trackio:
    """A Trackio run in project `tracetune` (local by default)."""

    def __init__(self, run_dir: Path, name: str, config: dict):
        import trackio

        self.trackio = trackio
        trackio.init(project="tracetune", name=name, config=config)

    def log(self, stream: str, step: int, values: dict[str, float]) -> None:
        self.trackio.log({f"{stream}/{k}": v for k, v in values.items()} | {f"{stream}/step": step})

    def finish(self, summary: dict[str, float]) -> None:
        self.trackio.log({f"final/{k}": v for k, v in summary.items()})
        self.trackio.finish()


SINKS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb, "trackio": Trackio}


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def _drop(sink, exc: Exception) -> None:
    log.warning("tracker %s failed (%s: %s); metrics.jsonl is unaffected, the run goes on without it",
                type(sink).__name__ if not isinstance(sink, str) else sink, type(exc).__name__, str(exc)[:200])  # fmt: skip
    if sink in _active:
        _active.remove(sink)


def start(names: list[str], run_dir: Path, config: dict) -> None:
    """Start every configured sink (those that cannot, warn and are left out)."""
    global _run_dir
    _active.clear()
    _run_dir = run_dir
    for name in names:
        try:
            _active.append(SINKS[name](run_dir, run_dir.name, config))
        except Exception as exc:  # noqa: BLE001 (not installed, not logged in, offline: warn and go on)
            _drop(name, exc)


def stream_of(path: Path, record: dict) -> str:
    """`train`/`val` for the run's own metrics.jsonl; else the file's directory in the run, with its split."""
    where = path.parent.relative_to(_run_dir).as_posix() if _run_dir else "."
    if path.name == ROUNDS:
        return f"{where}/rounds"
    split = record.get("split")
    if where == ".":
        return split or "train"
    return f"{where}/{split}" if split else where


def mirror(path: Path, record: dict) -> None:
    """One line just written to a run's metrics file, into every active sink."""
    if not _active or _run_dir is None or "step" not in record and "round" not in record:
        return
    values = scalars(record)
    step = int(record.get("step", record.get("round", 0)))
    for sink in list(_active):
        try:
            sink.log(stream_of(path, record), step, values)
        except Exception as exc:  # noqa: BLE001
            _drop(sink, exc)


def finish(summary: dict[str, float]) -> None:
    """The final scores into every sink, then close them."""
    global _run_dir
    for sink in list(_active):
        try:
            sink.finish(summary)
        except Exception as exc:  # noqa: BLE001
            _drop(sink, exc)
    _active.clear()
    _run_dir = None
