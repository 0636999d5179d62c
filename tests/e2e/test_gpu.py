"""The same pipeline on CUDA: runs where a GPU is visible, skips with a reason elsewhere."""

import json

import pytest

from tests.conftest import tiny_run_args
from tracetune.cli import main


@pytest.mark.gpu
def test_run_on_cuda_passes_the_gpu_gate(tmp_path):
    assert main(tiny_run_args(tmp_path, "output.run_name=g", "train.device=cuda", "train.precision=bf16-autocast")) == 0
    gates = {g["name"]: g for g in json.loads((tmp_path / "g" / "gates.json").read_text())["gates"]}
    assert gates["gpu_used"]["status"] == "pass"
    assert "nvidia-smi" in (tmp_path / "g" / "gpu_snapshot.txt").read_text()
    rows = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines() if '"val"' not in x]
    assert all(r["cuda_allocated_mb"] > 0 for r in rows)
