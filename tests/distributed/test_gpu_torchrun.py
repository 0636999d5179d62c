"""torchrun on CUDA with NCCL (one rank per visible GPU): DDP and FSDP2 pass every gate, GPU gate included."""

import json

import pytest
import torch

from tests.distributed.test_torchrun import launch, run_args, why


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_on_cuda_uses_nccl_and_passes_the_gates(tmp_path, strategy):
    nproc = torch.cuda.device_count()
    extra = (f"train.distributed={strategy}", "train.device=cuda", "train.precision=bf16-weights")
    result = launch(nproc, *run_args(tmp_path, strategy, *extra))
    assert result.returncode == 0, why(result)
    training = json.loads((tmp_path / strategy / "training.json").read_text())
    assert training["backend"] == "nccl" and training["world_size"] == nproc and training["strategy"] == strategy
    assert all(rank["device"].startswith(f"cuda:{i} ") for i, rank in enumerate(training["ranks"]))
    gates = json.loads((tmp_path / strategy / "gates.json").read_text())
    assert gates["passed"] and {g["name"]: g["status"] for g in gates["gates"]}["gpu_used"] == "pass"
