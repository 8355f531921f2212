"""Optimizer and learning-rate schedule of the recipe: SGD, linear lr scaling, 10x heads, poly decay."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from segkit.settings import OptimSettings, ScheduleSettings


def scaled_lr(optim: OptimSettings, batch_size: int) -> float:
    """Linear scaling rule: ``base_lr`` is for ``base_batch_size`` images per step."""
    return optim.base_lr * batch_size / optim.base_batch_size


def build_optimizer(model: nn.Module, optim: OptimSettings, batch_size: int) -> torch.optim.SGD:
    """SGD over two groups: the backbone at the scaled lr, the heads at ``head_lr_mult`` times it.

    ``model`` must have ``head_parameters()`` (a :class:`~segkit.models.segmentor.Segmentor`).
    """
    if optim.name != "sgd":
        raise ValueError(f"unknown optimizer {optim.name!r}; valid choices: sgd")
    lr = scaled_lr(optim, batch_size)
    head = {id(p) for p in model.head_parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head]
    groups = [{"params": backbone, "lr": lr, "name": "backbone"},
              {"params": model.head_parameters(), "lr": lr * optim.head_lr_mult, "name": "head"}]
    return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                           nesterov=optim.nesterov)


def poly_factor(iteration: int, total_iters: int, power: float = 0.9, warmup_iters: int = 0) -> float:
    """Multiplier of the initial lr at ``iteration`` (0-based): (1 - it/total)^power after a linear warm-up."""
    if iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    return max(0.0, 1.0 - iteration / total_iters) ** power


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleSettings,
                    total_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule (call ``step()`` after every optimizer step)."""
    if schedule.name != "poly":
        raise ValueError(f"unknown schedule {schedule.name!r}; valid choices: poly")
    power, warmup = schedule.power, schedule.warmup_iters
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: poly_factor(it, total_iters, power, warmup))
