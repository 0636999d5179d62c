"""TrainState and train_step: the one optimizer step that SFT, the benches and the tests all call.

`build_state` makes everything a step touches once (the model on its device, the loss module wrapped for
DDP/FSDP, optimizer, scheduler, precision helpers); `train_step` runs forward, backward, clip and update over
one optimizer step's micro-batches and reports what happened. Advancing the scheduler is the caller's, so a
caller that stops on a non-finite step saves the schedule as it was.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from tracetune import dist
from tracetune.config import Config
from tracetune.faults import crash_point, nan_injected
from tracetune.train import distributed
from tracetune.train.loss import CausalLMLoss, PolicySettings, TiedGradient, num_loss_tokens, unwrap_model
from tracetune.train.optim import MasterWeights, build_optimizer, lr_lambda, param_groups


@dataclass
class TrainState:
    """What a training step touches, built once by `build_state`."""

    model: torch.nn.Module  # the model being trained (LoRA-wrapped where asked), as saved
    net: torch.nn.Module  # the loss module over it, wrapped for DDP/FSDP; what a step calls
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.Tensor]  # what the optimizer steps: the trainable parameters or their fp32 masters
    master: MasterWeights | None  # bf16 weights: fp32 master copies the optimizer updates
    tied: TiedGradient | None  # one CPU process: the tied embedding/head gradient accumulated in place
    device: torch.device
    strategy: str  # single | ddp | fsdp
    autocast: bool  # bf16 autocast around the forward
    sharded_checkpoints: bool  # FSDP's checkpoint format (also for one process running an FSDP config)
    max_grad_norm: float | None
    num_trainable_params: int


@dataclass(frozen=True)
class StepResult:
    loss_sum: float  # summed token loss of the step, over every rank
    num_loss_tokens: int  # loss tokens of the whole step
    grad_norm: float
    finite: bool  # False: loss or gradient norm was NaN/inf, and no update was applied


def apply_lora(model, cfg: Config):
    from peft import LoraConfig, get_peft_model

    lora = cfg.train.lora
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    return get_peft_model(model, peft_config)


def build_state(
    cfg: Config, model, device: torch.device, total_steps: int, policy: PolicySettings | None = None
) -> TrainState:
    """Put `model` on `device` in the configured precision and strategy, and build its optimizer and schedule.
    With `policy`, batches carrying advantages are trained on the policy-gradient loss (rl/grpo.py)."""
    tc = cfg.train
    if tc.method == "lora":
        model = apply_lora(model, cfg)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(device)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    enabled = dist.current().enabled
    strategy = distributed.choose_strategy(tc.distributed, num_params, device) if enabled else "single"
    sharded = strategy == "fsdp" or tc.distributed == "fsdp"  # an FSDP config's format, at any world size
    # FSDP keeps fp32 sharded weights and computes in bf16 (its mixed-precision policy); one process running
    # an FSDP config does the same through autocast, so its checkpoints hold what an FSDP run's would.
    bf16_weights = tc.precision == "bf16-weights" and not sharded
    if bf16_weights:
        model.to(torch.bfloat16)
    model.train()
    layers = unwrap_model(model).get_decoder().layers
    if tc.compile:  # one compiled region per decoder layer, before FSDP wraps the same layers (as torchtitan does)
        for layer in layers:
            layer.compile()
    # Not on CUDA: its caching allocator has no page faults to save, and index_add_ there is nondeterministic.
    in_place = strategy == "single" and not bf16_weights and device.type == "cpu"
    tied = TiedGradient.for_model(model) if in_place else None
    net = distributed.wrap(CausalLMLoss(model, tied, policy), layers, strategy, tc.precision, device)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # FSDP's shards if wrapped
    master = MasterWeights([p for _, p in trainable]) if bf16_weights else None
    params = master.master if master else [p for _, p in trainable]
    groups = param_groups(list(zip([n for n, _ in trainable], params, strict=True)), tc.weight_decay)
    optimizer = build_optimizer(groups, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc, total_steps))
    autocast = tc.precision != "fp32" and strategy != "fsdp" and not bf16_weights
    return TrainState(
        model, net, optimizer, scheduler, params, master, tied, device, strategy, autocast, sharded,
        tc.max_grad_norm, num_params,
    )  # fmt: skip


def autocast_context(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(state: TrainState, micro_batches: list[dict], step: int) -> StepResult:
    """One optimizer step (number `step`, from 1) over `micro_batches`, the whole step's on every rank.

    Each rank runs its share (`distributed.shard_window`); every micro-batch's summed loss is divided by the
    loss tokens of the whole step, so accumulation equals one big batch, and multiplied by the world size,
    which DDP's and FSDP's gradient averaging divides back out. A non-finite loss or gradient norm applies no
    update.
    """
    d = dist.current()
    step_tokens = sum(num_loss_tokens(m) for m in micro_batches)
    share = distributed.shard_window(micro_batches, d)
    loss_sum = 0.0
    for k, (batch, weight) in enumerate(share):
        with distributed.gradient_sync(state.net, k == len(share) - 1):
            with autocast_context(state.autocast, state.device):
                s = state.net(**to_device(batch, state.device))
            if nan_injected(step):
                s = s * float("nan")
            (s * (weight * d.world_size) / step_tokens).backward()
        loss_sum += weight * s.item()
        crash_point(f"step-{step}/micro-{k}")
    loss_sum = dist.sum_across_ranks([loss_sum])[0]
    if state.tied:
        state.tied.attach_grad()
    if state.master:
        state.master.grads_to_master()
    clip = state.max_grad_norm or float("inf")
    grad_norm = _total_norm(torch.nn.utils.clip_grad_norm_(state.params, clip))
    finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
    if finite:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.tied:
        state.tied.reset()
    if state.master and finite:
        state.master.master_to_model()
    return StepResult(loss_sum, step_tokens, grad_norm, finite)


def _total_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float; under FSDP it is a DTensor whose full value needs its shards."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
