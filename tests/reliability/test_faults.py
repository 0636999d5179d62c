"""Fault injection: kill -9, SIGTERM, NaN, corrupt checkpoints, bad input, relaunch, killed evaluation.

Each test states its pass criterion; docs/RELIABILITY.md lists them with their results. Processes that must
die are real subprocesses of the CLI; the points where they die are the `crash_point`s of tracetune.faults.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_CONFIG

# 53 train examples / batch 4 = 14 micro-batches = 7 optimizer steps per epoch: step 10 is in epoch 2.
TRAIN_ARGS = [
    f"data.train_file={REPO}/data/train.jsonl",
    "eval.eval_file=null",
    "train.max_steps=10",
    "train.save_every_steps=3",
    "train.eval_every_steps=5",
    "train.keep_last_checkpoints=2",
    "train.record_example_ids=true",
]
EVAL_ARGS = [f"eval.eval_file={REPO}/data/eval.jsonl", "eval.max_items=8", "eval.batch_size=2"]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tracetune", *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300
    )


def run_args(root: Path, name: str, *extra: str) -> list[str]:
    return ["run", str(TINY_CONFIG), f"output.root={root}", f"output.run_name={name}", *TRAIN_ARGS, *extra]


def losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r.get("split", "train"), r["step"], r.get("loss")) for r in rows]


def consumed_ids(run_dir: Path) -> list[str]:
    return [i for x in (run_dir / "example_ids.jsonl").read_text().splitlines() for i in json.loads(x)["ids"]]


def weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


def assert_same_training(run_dir: Path, reference: Path) -> None:
    assert losses(run_dir) == losses(reference)  # every logged loss, bitwise, and no step logged twice
    assert consumed_ids(run_dir) == consumed_ids(reference)
    got, want = weights(run_dir / "final_model"), weights(reference / "final_model")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, and the names of every crash point it passes, in order."""
    root = tmp_path_factory.mktemp("ref")
    points = root / "points.txt"
    result = cli(*run_args(root, "ref"), env={"TRACETUNE_FAULT_LOG": str(points)})
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "ref", points.read_text().splitlines()


def _choose_kill_points(points: list[str], num: int = 20, seed: int = 0) -> list[int]:
    """Seeded choice of 1-based indices covering every kind of point: mid-accumulation, mid-step, after the
    update, after logging, the epoch boundary and each stage of the checkpoint writer."""
    rng = random.Random(seed)
    kinds = ["micro-0", "micro-1", "updated", "logged", "epoch-", "model-written", "staged", "renamed"]
    chosen = {rng.choice([i for i, p in enumerate(points, 1) if kind in p]) for kind in kinds}
    while len(chosen) < num:
        chosen.add(rng.randrange(1, len(points) + 1))
    return sorted(chosen)


def _kill_and_resume(reference, tmp_path, indices: list[int]) -> None:
    ref_dir, points = reference
    for index in indices:
        name = f"kill-{index}"
        killed = cli(*run_args(tmp_path, name), env={"TRACETUNE_KILL_AT": str(index)})
        assert killed.returncode == -signal.SIGKILL, (points[index - 1], killed.stderr[-2000:])
        resumed = cli("resume", str(tmp_path / name))
        assert resumed.returncode == 0, (points[index - 1], resumed.stderr[-3000:])
        assert_same_training(tmp_path / name, ref_dir)
        assert not list((tmp_path / name / "checkpoints").glob("*.staging")), points[index - 1]


@pytest.mark.slow
def test_kill_9_at_20_points_then_resume_matches_uninterrupted(reference, tmp_path):
    """1 and 3: kill -9 anywhere, resume to the end: final weights, every logged loss and the ids of the
    examples consumed equal the uninterrupted run's (20 seeded points; `make test-slow`)."""
    indices = _choose_kill_points(reference[1])
    assert len(indices) == 20
    _kill_and_resume(reference, tmp_path, indices)


def test_kill_9_mid_step_after_an_update_and_mid_checkpoint_then_resume_matches(reference, tmp_path):
    """The default suite's share of the matrix: one point between micro-batches of a step, one right after an
    optimizer update, one while a checkpoint is staged; each resumed run equals the uninterrupted one."""
    points = reference[1]
    middle = len(points) / 2  # past the first checkpoint, so each resume restores one
    kinds = ("micro-1", "updated", "staged")
    indices = [min((i for i, p in enumerate(points, 1) if kind in p), key=lambda i: abs(i - middle)) for kind in kinds]
    _kill_and_resume(reference, tmp_path, indices)


def test_sigterm_mid_step_checkpoints_and_exits_143(reference, tmp_path):
    """4 (training): SIGTERM mid-step: the step finishes, a committed checkpoint is written, metrics are
    flushed, exit 143; the resume matches the uninterrupted run."""
    ref_dir, points = reference
    index = next(i for i, p in enumerate(points, 1) if p == "step-4/micro-0")
    stopped = cli(*run_args(tmp_path, "term"), env={"TRACETUNE_SIGTERM_AT": str(index)})
    run_dir = tmp_path / "term"
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "stopped by SIGTERM after step 4" in stopped.stderr
    assert (run_dir / "checkpoints" / "step-000004" / "COMMITTED").is_file()
    assert losses(run_dir)[-1][:2] == ("train", 4)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert cli("resume", str(run_dir)).returncode == 0
    assert_same_training(run_dir, ref_dir)


@pytest.mark.slow
def test_sigterm_and_kill_mid_eval_keep_finished_predictions(tmp_path):
    """4 (evaluation) and 8: SIGTERM during evaluation exits 143 with every finished prediction kept; kill -9
    during evaluation leaves a file whose every line parses with each id once; the rerun completes the rest."""
    points_file = tmp_path / "points.txt"
    assert cli(*run_args(tmp_path, "ref", *EVAL_ARGS), env={"TRACETUNE_FAULT_LOG": str(points_file)}).returncode == 0
    points = points_file.read_text().splitlines()
    for how, env_key, code in (("term", "TRACETUNE_SIGTERM_AT", 143), ("kill", "TRACETUNE_KILL_AT", -signal.SIGKILL)):
        index = points.index("eval-final/batch-1") + 1
        result = cli(*run_args(tmp_path, how, *EVAL_ARGS), env={env_key: str(index)})
        assert result.returncode == code, result.stderr[-2000:]
        predictions = tmp_path / how / "eval" / "final" / "predictions.jsonl"
        ids = [json.loads(line)["id"] for line in predictions.read_text().splitlines()]
        assert len(ids) == 4 and len(set(ids)) == 4  # two finished batches of 2
        assert cli("resume", str(tmp_path / how)).returncode == 0
        ids = [json.loads(line)["id"] for line in predictions.read_text().splitlines()]
        assert len(ids) == 8 and len(set(ids)) == 8
        ref_rows = (tmp_path / "ref" / "eval" / "final" / "predictions.jsonl").read_text().splitlines()
        assert sorted(json.loads(r)["completion"] for r in ref_rows) == sorted(
            json.loads(r)["completion"] for r in predictions.read_text().splitlines()
        )


def test_nan_at_step_s_stops_with_weights_of_step_s_minus_1(tmp_path):
    """5: NaN injected at step 5: no update is applied, the exit is non-zero and names step 5, and the
    checkpointed weights equal an uninterrupted run's weights after step 4."""
    every_step = ["train.save_every_steps=1", "train.keep_last_checkpoints=20"]
    assert cli(*run_args(tmp_path, "clean", *every_step)).returncode == 0
    result = cli(*run_args(tmp_path, "nan"), env={"TRACETUNE_NAN_AT_STEP": "5"})
    assert result.returncode == 4 and "at step 5" in result.stderr
    checkpoints = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert checkpoints[-1] == "step-000004"
    got = weights(tmp_path / "nan" / "checkpoints" / "step-000004" / "model")
    want = weights(tmp_path / "clean" / "checkpoints" / "step-000004" / "model")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert max(s for _, s, _ in losses(tmp_path / "nan")) == 4
    skipped = cli(*run_args(tmp_path, "skip", "train.nonfinite_policy=skip"), env={"TRACETUNE_NAN_AT_STEP": "5"})
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert json.loads((tmp_path / "skip" / "training.json").read_text())["num_skipped_steps"] == 1


def _tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*")):
        digest.update(str(file.relative_to(path)).encode())
        if file.is_file():
            digest.update(file.read_bytes())
            digest.update(str(file.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def test_relaunch_without_resume_is_refused_and_changes_nothing(reference):
    """7: a second launch into an existing run directory is refused and its tree hash is unchanged."""
    ref_dir, _ = reference
    before = _tree_hash(ref_dir)
    from tracetune.cli import main

    assert main(run_args(ref_dir.parent, "ref")) == 2
    assert _tree_hash(ref_dir) == before


def test_resume_refuses_a_changed_run_and_lists_the_changes(reference, tmp_path, capsys):
    import shutil

    from tracetune.cli import main

    ref_dir, _ = reference
    copy = tmp_path / "ref"
    shutil.copytree(ref_dir, copy)
    (copy / "training.json").unlink()
    assert main([*run_args(tmp_path, "ref", "train.batch_size=2", "train.grad_accum_steps=4"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: 4 -> 2" in err and "train.grad_accum_steps: 2 -> 4" in err


def test_a_locked_run_directory_is_refused(tmp_path, capsys):
    from tracetune.cli import main
    from tracetune.lifecycle import run_lock

    with run_lock(tmp_path / "busy"):
        assert main(run_args(tmp_path, "busy")) == 2
    assert "in use by another process (pid" in capsys.readouterr().err
    assert not (tmp_path / "busy").exists()


def test_explicitly_loading_a_bad_checkpoint_names_the_bad_file(reference, tmp_path):
    """2: a checkpoint with a flipped byte is never loaded; asking for it explicitly names the file."""
    import shutil

    from tracetune.config import load_config
    from tracetune.errors import TracetuneError
    from tracetune.pipeline import load_for_training, load_inputs
    from tracetune.train.loop import fit

    ref_dir, _ = reference
    copy = tmp_path / "ref"
    shutil.copytree(ref_dir, copy)
    bad = copy / "checkpoints" / "step-000010"
    data = bytearray((bad / "trainer_state.pt").read_bytes())
    data[100] ^= 0x01
    (bad / "trainer_state.pt").write_bytes(bytes(data))
    cfg = load_config(copy / "config.yaml")
    tokenizer, model, train, val, _ = load_for_training(cfg, load_inputs(cfg))
    with pytest.raises(TracetuneError, match="step-000010/trainer_state.pt: sha256 mismatch"):
        fit(cfg, copy, model, tokenizer, train, val, resume_from=bad)


def test_second_signal_exits_at_once_and_sigint_maps_to_130():
    script = (
        "import os, signal, time\n"
        "from tracetune.faults import STOP\n"
        "with STOP:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert STOP.requested == signal.SIGINT\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "print('not reached')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 143 and "not reached" not in result.stdout
    from tracetune.faults import Interrupted

    assert Interrupted(signal.SIGINT, "here").exit_code == 130
