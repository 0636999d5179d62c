"""Trackers mirror metrics.jsonl: TensorBoard's event files and MLflow's file store read back equal it; a
sink that cannot start warns once and the run goes on."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import tiny_run_args
from tracetune import layout, tracking

needs = {name: importlib.util.find_spec(module) is not None for name, module in
         (("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb"))}  # fmt: skip


def _train_lines(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") is None and "loss" in r]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    from tracetune.cli import main

    root = tmp_path_factory.mktemp("tracked")
    sinks = [n for n in ("tensorboard", "mlflow") if needs[n]]
    if not sinks:
        pytest.skip("neither tensorboard nor mlflow is installed (pip install 'tracetune[trackers]')")
    args = tiny_run_args(root, "output.run_name=t", f"output.report_to=[{','.join(sinks)}]", "train.max_steps=4")
    assert main([*args, "eval.max_items=2", "eval.baselines=[zero_shot]"]) == 0
    return root / "t"


@pytest.mark.skipif(not needs["tensorboard"], reason="tensorboard is not installed")
def test_tensorboard_events_equal_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"))
    events.Reload()
    lines = _train_lines(tracked_run)
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(logged) == [r["step"] for r in lines]
    assert all(logged[r["step"]] == pytest.approx(r["loss"], rel=1e-6) for r in lines)
    listed = [p.relative_to(tracked_run).as_posix() for p in tracked_run.rglob("*") if p.is_file()]
    assert [f for f in listed if layout.describe(f) is None] == []  # the trackers' files are the layout's too
    val = [json.loads(x) for x in (tracked_run / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert [e.step for e in events.Scalars("val/loss")] == [r["step"] for r in val]
    assert "final/accuracy" in events.Tags()["scalars"]


@pytest.mark.skipif(not needs["tensorboard"], reason="tensorboard is not installed")
def test_train_verb_honours_report_to_and_records_its_run(tmp_path):
    """`tracetune train` opens its run directory as `run` does: run.json, env.json and the trackers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tracetune.cli import main

    args = tiny_run_args(tmp_path, "output.run_name=tr", "output.report_to=[tensorboard]", "train.max_steps=3")
    assert main(["train", *args[1:]]) == 0
    run_dir = tmp_path / "tr"
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert sorted(e.step for e in events.Scalars("train/loss")) == [r["step"] for r in _train_lines(run_dir)]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "trained" and run["ended_at"] and (run_dir / "env.json").is_file()
    listed = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()]
    assert [f for f in listed if layout.describe(f) is None] == []


@pytest.mark.skipif(not needs["mlflow"], reason="mlflow is not installed")
def test_mlflow_store_equals_metrics_jsonl(tracked_run):
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # reading MLflow 3's file store back, as the run wrote it

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tracetune").experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train.loss")}
    lines = _train_lines(tracked_run)
    assert history == {r["step"]: pytest.approx(r["loss"]) for r in lines}
    assert run.data.params["train.lr"] == "0.003" and "final.accuracy" in run.data.metrics


@pytest.mark.skipif(needs["wandb"], reason="wandb is installed here: the missing-package path cannot be shown")
def test_a_sink_that_cannot_start_warns_and_the_run_goes_on(tmp_path, caplog):
    from tracetune.cli import main

    args = tiny_run_args(tmp_path, "output.run_name=w", "output.report_to=[wandb]", "train.max_steps=2")
    assert main([*args, "eval.eval_file=null"]) == 0
    warnings = [r.message for r in caplog.records if "tracker wandb failed" in r.getMessage()]
    assert len(warnings) == 1 and (tmp_path / "w" / "metrics.jsonl").is_file()


def test_scalars_flatten_nested_numbers_and_streams_name_their_file(tmp_path):
    assert tracking.scalars({"step": 3, "reward": {"mean": 0.5, "std": 0.1}, "finite": True, "split": "x"}) == {
        "reward/mean": 0.5,
        "reward/std": 0.1,
    }
    tracking._run_dir = tmp_path
    try:
        assert tracking.stream_of(tmp_path / "metrics.jsonl", {"step": 1}) == "train"
        assert tracking.stream_of(tmp_path / "metrics.jsonl", {"split": "val"}) == "val"
        assert tracking.stream_of(tmp_path / "grpo" / "metrics.jsonl", {"split": "heldout"}) == "grpo/heldout"
        assert tracking.stream_of(tmp_path / "rft" / "round-2" / "metrics.jsonl", {}) == "rft/round-2"
        assert tracking.stream_of(tmp_path / "rft" / "rounds.jsonl", {"round": 1}) == "rft/rounds"
    finally:
        tracking._run_dir = None
