"""Optimisers and learning-rate schedules (stepped once per epoch)."""

from __future__ import annotations

import math

import torch
from torch import nn

from flareseg.config.schema import TrainConfig


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
    )


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """The multiplier of the base learning rate during `epoch` (0-based)."""
    progress = epoch / config.epochs
    if config.schedule == "step":  # reference: x0.1 from 66 % of the epochs, x0.05 from 86 %
        factor = 1.0
        for milestone, value in zip(config.step_milestones, config.step_factors):
            if progress >= milestone:
                factor = value
        return factor
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "poly":
        return (1.0 - progress) ** config.poly_power
    return 1.0


def set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: int) -> float:
    """Set every parameter group's learning rate for `epoch`; returns it."""
    lr = config.lr * lr_factor(config, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
