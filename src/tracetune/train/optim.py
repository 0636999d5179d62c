"""Optimizer, learning-rate schedule and fp32 master weights for bf16 models."""

from __future__ import annotations

import math

import torch

from tracetune.config import TrainConfig


class MasterWeights:
    """fp32 copies of bf16 parameters: the optimizer updates the copies, which are cast back after each step."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.model_params = params
        self.master = [p.detach().float().clone().requires_grad_(True) for p in params]

    def grads_to_master(self) -> None:
        for model_p, master_p in zip(self.model_params, self.master, strict=True):
            master_p.grad = None if model_p.grad is None else model_p.grad.float()
            model_p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        for model_p, master_p in zip(self.model_params, self.master, strict=True):
            model_p.copy_(master_p)


def param_groups(named_params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms and biases (1-D) are not decayed."""
    decay = [p for _, p in named_params if p.ndim >= 2]
    no_decay = [p for _, p in named_params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    # fused AdamW runs one kernel over all tensors on CUDA and CPU; foreach where fused is unavailable.
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the peak LR at a given step: linear warmup, then constant, linear or cosine decay to 0."""

    def multiplier(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier
