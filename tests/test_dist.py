"""The emulated-bf16 warning: only on a CPU without bf16 instructions, naming the fields that ask for bf16."""

import torch

from tracetune import dist

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_bf16_on_a_cpu_without_bf16_instructions_warns_with_the_fields_and_the_fix(monkeypatch):
    monkeypatch.setattr(dist, "cpu_has_bf16", lambda: False)
    warning = dist.emulated_bf16(CPU, {"train.precision": "bf16-autocast", "eval.precision": "fp32"})
    assert warning.startswith("train.precision=bf16-autocast on a CPU without bf16 instructions")
    assert warning.endswith("fix: train.precision=fp32") and "eval.precision" not in warning
    assert dist.emulated_bf16(CPU, {"eval.precision": "fp32"}) is None
    assert dist.emulated_bf16(CUDA, {"eval.precision": "bf16"}) is None


def test_no_warning_where_the_cpu_has_bf16(monkeypatch):
    monkeypatch.setattr(dist, "cpu_has_bf16", lambda: True)
    assert dist.emulated_bf16(CPU, {"train.precision": "bf16-weights", "eval.precision": "bf16"}) is None
