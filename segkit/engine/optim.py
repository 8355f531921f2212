"""Optimizer and learning-rate schedule of the recipe: SGD, linear lr scaling, 10x heads, poly decay."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from segkit.errors import ConfigError


def scaled_lr(optim_cfg: Mapping[str, Any], batch_size: int) -> float:
    """Linear scaling rule: ``base_lr`` is for ``base_batch_size`` images per step."""
    return optim_cfg["base_lr"] * batch_size / optim_cfg["base_batch_size"]


def build_optimizer(model: nn.Module, optim_cfg: Mapping[str, Any], batch_size: int) -> torch.optim.SGD:
    """SGD over two groups: the backbone at the scaled lr, the heads at ``head_lr_mult`` times it.

    ``model`` must have ``head_parameters()`` (a :class:`~segkit.models.segmentor.Segmentor`).
    """
    if optim_cfg["name"] != "sgd":
        raise ConfigError(f"unknown optimizer {optim_cfg['name']!r}; valid choices: sgd")
    lr = scaled_lr(optim_cfg, batch_size)
    head = {id(p) for p in model.head_parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head]
    groups = [{"params": backbone, "lr": lr, "name": "backbone"},
              {"params": model.head_parameters(), "lr": lr * optim_cfg["head_lr_mult"], "name": "head"}]
    return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg["momentum"],
                           weight_decay=optim_cfg["weight_decay"], nesterov=optim_cfg.get("nesterov", False))


def poly_factor(iteration: int, total_iters: int, power: float = 0.9, warmup_iters: int = 0) -> float:
    """Multiplier of the initial lr at ``iteration`` (0-based): (1 - it/total)^power after a linear warm-up."""
    if iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    return max(0.0, 1.0 - iteration / total_iters) ** power


def build_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg: Mapping[str, Any],
                    total_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule (call ``step()`` after every optimizer step)."""
    if schedule_cfg["name"] != "poly":
        raise ConfigError(f"unknown schedule {schedule_cfg['name']!r}; valid choices: poly")
    power, warmup = float(schedule_cfg["power"]), int(schedule_cfg.get("warmup_iters", 0))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: poly_factor(it, total_iters, power, warmup))
