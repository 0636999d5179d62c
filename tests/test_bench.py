"""The benchmark's workers still run against the current APIs (tiny model; they print JSON, write nothing)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize(
    "worker",
    ["tracetune", *(pytest.param(w, marks=pytest.mark.slow) for w in ("generate", "trl", "old"))],
)
def test_bench_worker_runs_on_the_tiny_model(worker):
    args = ["--worker", worker, "--steps", "2", "--warmup", "1", "--eval-items", "4", "--source", "tiny:gemma3"]
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["allocator"] == "glibc"  # a worker runs on what its parent gave it; here, nothing preloaded
    if worker == "generate":
        assert record["num_items"] == 4 and record["tracetune"]["items_per_s"] > 0
    else:
        assert record["real_tokens_per_s"] > 0 and record["val_loss"] > 0 and record["achieved_gflops"] > 0


def test_gpu_bench_runs_the_real_step_on_the_cpu():
    args = ["--device", "cpu", "--arch", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1"]
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_bench.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout[result.stdout.index("{") :])
    assert record["arch"] == "tiny" and record["tokens_per_s"] > 0


def _run_bench(script: str, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_gpu_grpo_bench_runs_the_stage_pieces_on_the_cpu():
    args = ["--device", "cpu", "--arch", "tiny", "--prompts", "2", "--group", "2", "--tokens", "6", "--steps", "2"]
    record = _run_bench("gpu_grpo.py", *args, "--micro-batch", "2")
    assert (
        record["arch"] == "tiny"
        and record["steps_timed"] == 2
        and record["completions_generated_and_trained_per_s"] > 0
    )


def test_bench_medians_take_any_number_of_repeats_and_the_table_reads_flops_against_the_peak():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import run as bench_run
    finally:
        sys.path.remove(str(REPO / "bench"))
    rows = [{"achieved_gflops": 2.0, "allocator": "glibc"}, {"achieved_gflops": 4.0, "allocator": "glibc"}]
    assert bench_run.medians(rows) == {"achieved_gflops": 3.0}  # two repeats: the text field is left out
    keys = dict.fromkeys(
        ["real_tokens_per_s", "achieved_gflops", "loss_tokens_per_s", "samples_per_s", "seconds_per_step",
         "peak_rss_mb", "pad_fraction", "final_train_loss", "val_loss"], 1.0
    )  # fmt: skip
    result = {
        "training_median": {s: {**keys, "achieved_gflops": 5.0} for s in bench_run.SYSTEMS},
        "allocators": {s: ["glibc"] for s in bench_run.SYSTEMS},
        "generation": None,
        "matmul_peak": bench_run.matmul_peak("fp32", size=64, seconds=0.05) | {"gflops": 50.0},
    }
    table = bench_run._table(result)
    assert (
        "| achieved GFLOP/s" in table and "| share of the measured fp32 matmul peak (50.0 GFLOP/s) | 10.0% |" in table
    )
