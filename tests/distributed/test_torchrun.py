"""torchrun with 2 CPU processes (gloo) on the tiny model: DDP and FSDP2 against one process.

A run of 2 ranks x 2 accumulation x batch 4 has the global batch of one process with accumulation 4, so
every logged loss must agree within 1e-5. Runs are real `python -m torch.distributed.run` subprocesses of
the CLI; faults come from tracetune.faults (TRACETUNE_KILL_AT_POINT, TRACETUNE_FAULT_RANK).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_CONFIG
from tracetune.models.checkpoints import latest_good_checkpoint, verify_checkpoint

ARGS = [f"data.train_file={REPO}/data/train.jsonl", f"eval.eval_file={REPO}/data/eval.jsonl"]
# PYTHONFAULTHANDLER: a rank that aborts (SIGABRT, SIGSEGV) prints every thread's Python stack into stderr,
# which the failing assertion shows.
ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TRACETUNE_DIST_TIMEOUT_MIN": "2", "PYTHONFAULTHANDLER": "1"}


def launch(nproc: int | None, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`tracetune ARGS` under torchrun with nproc ranks, or as one plain process when nproc is None."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*(torchrun if nproc else [sys.executable]), "-m", "tracetune", *args]
    full_env = {**os.environ, **ENV, **(env or {})}
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


def why(result: subprocess.CompletedProcess) -> str:
    """What a failed launch printed: from the first fault (a crashed rank's "Fatal Python error", a C++
    "terminate called", a Python traceback) 3000 characters on, and the last 3000."""
    err = result.stderr
    starts = [i for i in (err.find(m) for m in ("terminate called", "Fatal Python error", "Traceback")) if i >= 0]
    head = err[min(starts) : min(starts) + 3000] if starts else ""
    return f"{head}\n...\n{err[-3000:]}"


def run_args(root: Path, name: str, *extra: str) -> list[str]:
    return ["run", str(TINY_CONFIG), f"output.root={root}", f"output.run_name={name}", *ARGS, *extra]


def logged_losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r.get("split", "train"), r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_losses_match(run_dir: Path, reference: Path) -> None:
    got, want = logged_losses(run_dir), logged_losses(reference)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    worst = max(abs(g[2] - w[2]) for g, w in zip(got, want, strict=True))
    assert worst < 1e-5, worst


def files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process with accumulation 4: the reference every distributed run is held to."""
    root = tmp_path_factory.mktemp("dist")
    result = launch(None, *run_args(root, "single", "train.grad_accum_steps=4"))
    assert result.returncode == 0, why(result)
    return root


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_ranks_match_one_process_and_only_rank0_writes(runs, strategy):
    result = launch(2, *run_args(runs, strategy, f"train.distributed={strategy}"))
    assert result.returncode == 0, why(result)
    run_dir, single = runs / strategy, runs / "single"
    assert_losses_match(run_dir, single)
    # Rank 1 wrote nothing of its own: the files of one process (an FSDP checkpoint holds a shard per rank
    # instead of model/ and optimizer.pt), and no line twice.
    if strategy == "ddp":
        assert files(run_dir) == files(single)
    else:
        assert {f for f in files(run_dir) if not f.startswith("checkpoints/")} == {
            f for f in files(single) if not f.startswith("checkpoints/")
        }
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == len(
        (single / "metrics.jsonl").read_text().splitlines()
    )
    training = json.loads((run_dir / "training.json").read_text())
    assert training["world_size"] == 2 and training["backend"] == "gloo" and training["strategy"] == strategy
    assert training["global_batch_size"] == 16 and [r["device"] for r in training["ranks"]] == ["cpu", "cpu"]
    assert training["checkpoint_format"] == ("dcp" if strategy == "fsdp" else "hf")
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    gates = json.loads((run_dir / "gates.json").read_text())
    assert gates["passed"], gates
    predictions = [json.loads(x) for x in (run_dir / "eval" / "final" / "predictions.jsonl").read_text().splitlines()]
    eval_ids = [json.loads(x)["id"] for x in (REPO / "data" / "eval.jsonl").read_text().splitlines()][:8]
    assert [p["id"] for p in predictions] == eval_ids  # each item once, gathered in eval-set order
    if strategy == "fsdp":
        shards = sorted(p.name for p in (run_dir / "checkpoints" / "step-000008" / "dcp").iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_killed_rank_fails_the_run_and_it_resumes(runs):
    """Rank 1 is killed -9 in step 6, after the step-4 checkpoint: the run fails, step 4 stays committed and
    intact, and a relaunch finishes with the uninterrupted losses."""
    killed = {"TRACETUNE_KILL_AT_POINT": "step-6/micro-0", "TRACETUNE_FAULT_RANK": "1"}
    result = launch(2, *run_args(runs, "killed", "train.distributed=fsdp"), env=killed)
    assert result.returncode != 0
    run_dir = runs / "killed"
    checkpoint = latest_good_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step-000004" and not verify_checkpoint(checkpoint)
    assert not (run_dir / "training.json").exists()
    result = launch(2, "resume", str(run_dir))
    assert result.returncode == 0, why(result)
    assert_losses_match(run_dir, runs / "single")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "first", "then"),
    [("fsdp", 2, None), ("fsdp", None, 2), ("ddp", None, 2)],
    ids=["fsdp-2-ranks-then-1-process", "fsdp-1-process-then-2-ranks", "ddp-1-process-then-2-ranks"],
)
def test_checkpoint_resumes_at_another_world_size(runs, strategy, first, then):
    name = f"{strategy}-{first}-{then}"
    accum = {None: "train.grad_accum_steps=4", 2: "train.grad_accum_steps=2"}
    stop = {"TRACETUNE_KILL_AT_POINT": "step-5/micro-0", "TRACETUNE_FAULT_RANK": "0"}
    result = launch(first, *run_args(runs, name, f"train.distributed={strategy}", accum[first]), env=stop)
    assert result.returncode != 0
    run_dir = runs / name
    assert latest_good_checkpoint(run_dir / "checkpoints").name == "step-000004"
    refused = launch(then, "resume", str(run_dir))  # the accumulation must change with the world size
    assert refused.returncode == (2 if then is None else 1)  # torchrun exits 1 when a rank fails
    assert "global batch" in refused.stderr and f"fix: keep it with {accum[then]}" in refused.stderr
    result = launch(then, "resume", str(run_dir), accum[then])
    assert result.returncode == 0, why(result)
    assert_losses_match(run_dir, runs / "single")
    assert json.loads((run_dir / "training.json").read_text())["world_size"] == (then or 1)


@pytest.mark.slow
def test_lora_under_ddp_matches_one_process(runs):
    single = launch(None, *run_args(runs, "single-lora", "train.method=lora", "train.grad_accum_steps=4"))
    assert single.returncode == 0, why(single)
    result = launch(2, *run_args(runs, "ddp-lora", "train.method=lora", "train.distributed=ddp"))
    assert result.returncode == 0, why(result)
    assert_losses_match(runs / "ddp-lora", runs / "single-lora")
    assert files(runs / "ddp-lora") == files(runs / "single-lora")  # adapter/, merged final_model/, nothing else


@pytest.mark.slow
def test_fsdp_mixed_precision_trains_and_its_checkpoint_reloads_within_tolerance(runs):
    """bf16 compute over fp32 sharded weights (FSDP's policy): a plain fp32 reload cannot be bit-exact, so the
    reload gate holds it to gates.probe_cross_device_atol and says so."""
    result = launch(2, *run_args(runs, "fsdp-bf16", "train.distributed=fsdp", "train.precision=bf16-weights"))
    assert result.returncode == 0, why(result)
    gates = {g["name"]: g for g in json.loads((runs / "fsdp-bf16" / "gates.json").read_text())["gates"]}
    reload = gates["checkpoint_reloads"]
    assert reload["status"] == "pass" and reload["detail"].endswith("(inexact)") and 0 < reload["value"] < 0.1
    assert gates["loss_decreased"]["status"] == "pass"


@pytest.mark.slow
def test_grpo_on_two_ranks_matches_one_process(tmp_path):
    """Each rank samples every second prompt of a step and all ranks then train on the whole step, so the
    rewards, losses and gradient norms of 2 DDP ranks are those of one process."""
    from tests.e2e.test_rl import GRPO, _traces

    extra = [f"data.train_file={_traces(tmp_path)}", "train.max_steps=30", "eval.max_items=4", "eval.run_base=false",
             "eval.max_new_tokens=12", *GRPO, "grpo.num_steps=3", "grpo.eval_every_steps=3",
             "gates.max_truncation_rate=1"]  # fmt: skip  # 12 characters cut the traces' answers off
    single = launch(None, *run_args(tmp_path, "single", *extra))
    assert single.returncode in (0, 3), why(single)
    ranks = launch(2, *run_args(tmp_path, "ddp", *extra, "train.distributed=ddp", "train.grad_accum_steps=1"))
    assert ranks.returncode in (0, 3), why(ranks)

    def steps(run):
        rows = [json.loads(x) for x in (tmp_path / run / "grpo" / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "reward" in r]

    one, two = steps("single"), steps("ddp")
    assert [r["reward"] for r in one] == [r["reward"] for r in two]  # the same samples
    assert sum(r["num_trained_completions"] for r in one) > 0
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "entropy"):
            assert (key in a) == (key in b) and abs(a.get(key, 0) - b.get(key, 0)) < 1e-5, (key, a, b)
