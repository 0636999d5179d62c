"""Environment and GPU snapshots: what machine and software produced a run."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from tracetune import allocator
from tracetune.eval.invariance import probe_kernels
from tracetune.layout import RunLayout, write_json


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# What evaluation does about oneDNN's AMX kernels (docs/PERFORMANCE.md, "Batch invariance by CPU kind").
EVALUATION_NUMERICS = (
    "oneDNN runs whatever kernels this CPU has (AMX included: ONEDNN_MAX_CPU_ISA is not set by tracetune); "
    "cpu_kernels and each evaluation's batch_invariance.json say whether answers are those of one-at-a-time "
    "decoding here, and where they are not the report's verdict says answers may move with eval.batch_size"
)


def environment(device: str, eval_precision: str = "bf16") -> dict:
    """Everything env.json records; the kernel checks run in the evaluation's precision (bf16 or fp32)."""
    packages = sorted(
        {(d.metadata["Name"] or "?").lower(): d.version for d in importlib.metadata.distributions()}.items()
    )
    cuda = torch.cuda.is_available()
    return {
        "os": platform.platform(),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "torch_num_threads": torch.get_num_threads(),
        **allocator.describe(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else cpu_model(),
        "cpu_kernels": probe_kernels(torch.bfloat16 if eval_precision == "bf16" else torch.float32),
        "evaluation_numerics": EVALUATION_NUMERICS,
        "packages": dict(packages),
    }


def write_env(run_dir: Path, device: str, eval_precision: str) -> dict:
    env = environment(device, eval_precision)
    write_json(RunLayout(run_dir).env, env)
    lines = [f"{k}: {v}" for k, v in env.items() if k != "packages"]
    lines += ["", "packages:"] + [f"  {name}=={version}" for name, version in env["packages"].items()]
    RunLayout(run_dir).env_snapshot.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return env


def _nvidia_smi() -> str:
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi not found"
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"


def write_gpu_snapshot(run_dir: Path, device: str, phase: str) -> None:
    """Append the GPU state at `phase` (start or end) to gpu_snapshot.txt; a CPU run says so plainly."""
    path = RunLayout(run_dir).gpu_snapshot
    with open(path, "a", encoding="utf-8", newline="\n") as handle:
        if device != "cuda":
            visible = (
                f"{torch.cuda.device_count()} CUDA device(s) visible"
                if torch.cuda.is_available()
                else "no CUDA device visible"
            )
            handle.write(f"[{phase}] No GPU was used: this run ran on the CPU ({visible}).\n")
            return
        handle.write(f"[{phase}] nvidia-smi\n{_nvidia_smi()}\n")
        if phase == "end":
            peak = torch.cuda.max_memory_allocated() / 2**30
            reserved = torch.cuda.max_memory_reserved() / 2**30
            handle.write(f"[end] peak CUDA memory: allocated {peak:.2f} GiB, reserved {reserved:.2f} GiB\n")
