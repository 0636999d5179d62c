"""DDP and FSDP2 for training: the strategy, wrapping the loss module, gradient sync, and each rank's share of
an optimizer step's micro-batches. The process group itself is tracetune.dist's."""

from __future__ import annotations

import contextlib
import math

import torch

from tracetune import dist
from tracetune.dist import Dist


def choose_strategy(requested: str, num_params: int, device: torch.device) -> str:
    """ddp or fsdp for `train.distributed` (auto: fsdp when a replica's training state exceeds 60% of a GPU)."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "ddp"
    state_bytes = 16 * num_params  # fp32 weights, gradients and two AdamW moments
    return "fsdp" if state_bytes > 0.6 * torch.cuda.get_device_properties(device).total_memory else "ddp"


def wrap(net: torch.nn.Module, decoder_layers, strategy: str, precision: str, device: torch.device):
    """DDP around `net`, or FSDP2 with one unit per decoder layer plus the root; `net` itself when single."""
    if not dist.current().enabled:
        return net
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables) are constants, so there is nothing to broadcast before each forward.
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 compute over fp32 sharded weights, gradients reduced in fp32: FSDP's own master-weight scheme.
    policy = (
        MixedPrecisionPolicy()
        if precision == "fp32"
        else MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    )
    for layer in decoder_layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(net, mp_policy=policy)
    return net


def gradient_sync(net: torch.nn.Module, enabled: bool):
    """Context for one micro-batch's backward: reduce gradients only on the last micro-batch of a step."""
    if hasattr(net, "no_sync"):  # DDP
        return contextlib.nullcontext() if enabled else net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
        net.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def shard_window(window: list, d: Dist) -> list[tuple[object, float]]:
    """This rank's micro-batches of one optimizer step: every world_size-th, from its rank on.

    The window's micro-batches go to ranks round-robin, so across ranks each is used exactly once. A rank
    left with fewer gets weight-0 repeats of the window's first micro-batch: every rank must run the same
    number of forward/backward passes, because DDP and FSDP communicate inside them.
    """
    if not window:
        return []
    mine = [(b, 1.0) for b in window[d.rank :: d.world_size]]
    count = math.ceil(len(window) / d.world_size)
    return mine + [(window[0], 0.0)] * (count - len(mine))
