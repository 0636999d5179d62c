"""torchrun's process group, device resolution and the few collectives the pipeline needs: the ground floor
that training, evaluation and evidence all import.

Launched by `torchrun`, every rank runs the same `tracetune run`. Rank 0 alone writes the run directory
(except the shards of an FSDP checkpoint, which each rank writes itself); every rank trains and generates
its share. Without torchrun (no WORLD_SIZE in the environment) nothing here starts a process group, and
every helper degrades to the single-process answer, so callers never branch on "am I distributed".
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tracetune.errors import TracetuneError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # None: one process, no process group

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current = Dist()


def current() -> Dist:
    return _current


def init_from_env(device: str) -> Dist:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); a no-op outside torchrun or when joined."""
    global _current
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return _current
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    # A dead peer must fail the run in minutes, not hang it for the default half hour.
    dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("TRACETUNE_DIST_TIMEOUT_MIN", "10"))))
    _current = Dist(dist.get_rank(), local_rank, dist.get_world_size(), backend)
    return _current


def shutdown() -> None:
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = Dist()


def resolve_device(requested: str) -> torch.device:
    """`train.device` as a device: auto takes CUDA where one is visible."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise TracetuneError("train.device is cuda but no CUDA device is visible; fix: set train.device=cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's bf16 kernels: AVX-512 BF16 or AMX). Elsewhere, on
    AVX2-only CPUs such as most laptops', bf16 is emulated: greedy generation of Gemma 3 270M ran 2.9-5.2x slower
    in bf16 than in fp32 on a 2-core AVX2 EPYC."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def native_bf16(requested_device: str) -> bool:
    """Whether the device `train.device` names computes bf16 natively: a CUDA GPU with bf16, or such a CPU."""
    if requested_device != "cpu" and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def emulated_bf16(device: torch.device, precisions: dict[str, str]) -> str | None:
    """A warning naming the config fields that ask for bf16 (`precisions`: field -> value) on a CPU without
    bf16 instructions, with the fix; None where there is nothing to warn about."""
    asked = [f"{name}={value}" for name, value in precisions.items() if value != "fp32"]
    if device.type != "cpu" or not asked or cpu_has_bf16():
        return None
    fixes = " ".join(f"{name}=fp32" for name, value in precisions.items() if value != "fp32")
    return (
        f"{', '.join(asked)} on a CPU without bf16 instructions: bf16 is emulated here and runs several times "
        f"slower than fp32; fix: {fixes}"
    )


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK under torchrun on GPUs."""
    if device.type == "cuda" and _current.enabled:
        return torch.device("cuda", _current.local_rank)
    return device


def barrier() -> None:
    if _current.enabled:
        dist.barrier()


def broadcast_from_main(value):
    """Rank 0's value on every rank (any picklable object)."""
    if not _current.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(value) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not _current.enabled:
        return [value]
    out = [None] * _current.world_size
    dist.all_gather_object(out, value)
    return out


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over ranks, in float64 so a reduced loss keeps its digits."""
    if not _current.enabled:
        return values
    device = torch.device("cuda", _current.local_rank) if _current.backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    return sum_across_ranks([float(flag)])[0] > 0


def stop_agreed(requested: int | None) -> int | None:
    """A stop signal seen by any rank, agreed by all, so every rank saves and stops at the same step."""
    if not _current.enabled:
        return requested
    return (requested or signal.SIGTERM) if any_rank(requested is not None) else None


def on_main(fn):
    """Run `fn` on rank 0 and hand its result, or its TracetuneError, to every rank."""
    if not _current.enabled:
        return fn()
    outcome = None
    if _current.is_main:
        try:
            outcome = ("ok", fn())
        except TracetuneError as exc:
            outcome = ("error", (str(exc), exc.exit_code))
            raise
        finally:
            outcome = broadcast_from_main(outcome or ("error", ("rank 0 failed", 1)))
        return outcome[1]
    kind, payload = broadcast_from_main(None)
    if kind == "error":
        error = TracetuneError(payload[0])
        error.exit_code = payload[1]
        raise error
    return payload


def describe(device: torch.device) -> dict:
    """World size, backend and each rank's host and training device, for run.json and training.json."""
    name = f"{device} {torch.cuda.get_device_name(device)}" if device.type == "cuda" else str(device)
    return {
        "world_size": _current.world_size,
        "backend": _current.backend,
        "ranks": gather_to_all({"host": socket.gethostname(), "device": name}),
    }
